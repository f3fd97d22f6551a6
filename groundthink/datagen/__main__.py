"""`python -m groundthink.datagen ...` is `groundthink-datagen ...`."""

from groundthink.datagen.cli import main

if __name__ == "__main__":
    main()
