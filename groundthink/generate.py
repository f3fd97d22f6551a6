"""`groundthink-generate`: text from a trained run, streamed to the terminal as it is produced.

    groundthink-generate outputs/default/<run> --prompt "Once upon a time" --max-tokens 200 --temperature 0.8
    echo "Once upon a time" | groundthink-generate outputs/default/<run> --seed 1
    groundthink-generate outputs/default/<run> --chat --system "You are a terse assistant."

Prompt mode continues the text (from --prompt, or standard input) and writes only the continuation to standard
output; a one-line summary (tokens, finish reason, tokens/s) goes to standard error.

Chat mode reads one user message per line and answers each in the control-token format the SFT data uses
(`groundthink.data.render_chat`: `<|role|>content<|end|>` per turn, turns joined by a newline): the user turn and
an opening `<|assistant|>` are fed, the answer streams until `<|end|>` (or --max-tokens), and the turn is closed
with `<|end|>`. The conversation lives in the model's carried state, never re-fed, so memory stays constant however
long the chat runs (attention layers keep only their window). `/reset` starts a new conversation, `/exit` or
end of input quits. A message containing a control token is refused (it would open a turn the user did not
write). Sampling: --temperature (0 = greedy), --top-k, --top-p, --max-tokens, --seed, --stop; see
groundthink/generation.py for what each means.
"""

from __future__ import annotations

import argparse
import sys
import time


def _params(args, *, seed_offset: int = 0, stop_ids: tuple[int, ...] = ()):
    from groundthink.generation import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=None if args.seed is None else args.seed + seed_offset,
                          stop=tuple(args.stop or ()), stop_token_ids=stop_ids)


def _write_stream(stream, out) -> tuple[float, object]:
    started = time.perf_counter()
    for event in stream:
        if event.text:
            out.write(event.text)
            out.flush()
    return time.perf_counter() - started, stream.completion


def _summary(done, seconds: float) -> str:
    rate = done.completion_tokens / seconds if seconds > 0 else 0.0
    return (f"[{done.completion_tokens} tokens, finish_reason={done.finish_reason}, {rate:.1f} tokens/s, "
            f"prompt {done.prompt_tokens} tokens]")


def run_prompt(engine, args, prompt: str) -> int:
    stream = engine.stream(prompt, _params(args))
    seconds, done = _write_stream(stream, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(_summary(done, seconds), file=sys.stderr)
    return 0


def run_chat(engine, tokenizer, args) -> int:
    from groundthink.data.tokenizer import END_OF_TURN_TOKEN, ROLE_TOKENS

    end_id = tokenizer.control_ids[END_OF_TURN_TOKEN]
    closing = [end_id, *tokenizer.encode("\n")]
    interactive = sys.stdin.isatty()

    def opening() -> list[int]:
        return tokenizer.encode(f"{ROLE_TOKENS['system']}{args.system}{END_OF_TURN_TOKEN}\n") if args.system else []

    cache, carry, turn = None, opening(), 0
    if interactive:
        print("chat: one message per line; /reset starts over, /exit or Ctrl+D quits", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            cache, carry = None, opening()
            print("[new conversation]", file=sys.stderr)
            continue
        if not message.strip():
            continue
        if any(token in message for token in tokenizer.control_ids):
            print("[refused: the message contains a control token such as <|user|>]", file=sys.stderr)
            continue
        ids = carry + tokenizer.encode(f"{ROLE_TOKENS['user']}{message}{END_OF_TURN_TOKEN}\n"
                                       f"{ROLE_TOKENS['assistant']}")
        stream = engine.stream(ids, _params(args, seed_offset=turn, stop_ids=(end_id,)), cache=cache)
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        seconds, done = _write_stream(stream, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            print(_summary(done, seconds), file=sys.stderr)
        # Close the assistant turn in the carried state: tokens sampled but not yet fed (not the end tokens,
        # which the closing adds), then <|end|> and the newline that separates turns.
        cache = stream.cache
        carry = [t for t in stream.unfed if t != end_id and t not in engine.lm.eos_ids] + closing
        turn += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="groundthink-generate",
                                     description="Stream text from a trained GroundThink run (a prompt, or a chat).")
    parser.add_argument("run", help="a run folder (newest good checkpoint) or a checkpoint file")
    parser.add_argument("--prompt", help="text to continue (default: read standard input)")
    parser.add_argument("--chat", action="store_true", help="interactive chat with the control-token roles")
    parser.add_argument("--system", help="chat mode: a system message opening the conversation")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--quiet", action="store_true", help="no summary line on standard error")
    args = parser.parse_args(argv)

    if args.chat and args.prompt is not None:
        parser.error("--prompt and --chat are exclusive (chat reads its messages from standard input)")
    if not args.chat and args.system is not None:
        parser.error("--system belongs to --chat")
    prompt = args.prompt
    if not args.chat and prompt is None:
        if sys.stdin.isatty():
            parser.error("give --prompt TEXT, pipe the prompt on standard input, or use --chat")
        prompt = sys.stdin.read()

    import torch

    import groundthink
    from groundthink.generation import GenerationEngine, GenerationError

    try:
        _params(args).validate()
    except GenerationError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        loaded = groundthink.load(args.run, device=args.device, dtype=dtype)
        engine = GenerationEngine.from_run(loaded)
    except (groundthink.LoadError, GenerationError, AttributeError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        code = run_chat(engine, loaded.tokenizer, args) if args.chat else run_prompt(engine, args, prompt)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        code = 130
    except GenerationError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
