"""The commands README.md and docs/*.md print, found and parsed without running them.

`printed_commands(root)` finds every `python -m MODULE ...` and `python benchmarks/NAME.py ...`
in the pages: in code blocks (a line, with its `\\` continuations) and in inline code spans of
the prose. `config_fields(root)` finds every `--config.FIELD` the pages name anywhere.

Run as a script (`python tests/doc_commands.py`, JSON commands on stdin), it parses each command
with the command's own parser and stops there: argparse's `parse_args` and absl's `app.run`
(the config file loaded, every `--config.FIELD` checked and its value typed) are patched to
return after parsing. It prints one JSON line per command: {"ok": bool, "error": "..."}. The test
runs it in a process of its own (each absl command defines its flags on absl's global registry,
and `coconut_jax.plan --devices` sets XLA's environment).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import sys

# A line that needs files this repository does not have (the reference's YAML, say) says so in
# a comment: its module must exist, but it is not parsed.
NEEDS = "# needs:"
COMMAND = re.compile(r"(?<![\w./-])python (?:-m [\w.]+|benchmarks/\w+\.py)")
SPAN = re.compile(r"`([^`]+)`")
FIELD = re.compile(r"--config\.([A-Za-z_][\w.]*)")
STOP_TOKENS = {"|", ">", ">>", "&&", ";", "2>&1"}


def pages(root: str) -> list[str]:
    docs = os.path.join(root, "docs")
    return [os.path.join(root, "README.md")] + sorted(
        os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md"))


def _split(text: str) -> list[str] | None:
    """The command's words up to a pipe, redirection or chained command; a bare `...` dropped.
    None if it does not parse as shell words."""
    text = re.sub(r"(?<=\s)\.\.\.(?=\s|$)", "", text)  # a bare `...`: "and so on", not an argument
    for attempt in (text, text.replace("'", "")):  # a command quoted inside another (gcloud --command='...')
        try:
            words = shlex.split(attempt, comments=True)
            break
        except ValueError:
            continue
    else:
        return None
    out = []
    for w in words:
        if w in STOP_TOKENS:
            break
        out.append(w)
    return out


def printed_commands(root: str) -> list[dict]:
    """[{"where": "docs/x.md:12", "words": [...], "needs": bool}] of every printed command."""
    found = []
    for path in pages(root):
        rel = os.path.relpath(path, root)
        lines = open(path, encoding="utf-8").read().splitlines()
        fenced, i = False, 0
        prose: list[tuple[int, str]] = []

        def flush_prose():
            text = " ".join(t for _, t in prose)
            for span in SPAN.findall(text):
                for m in COMMAND.finditer(span):
                    line_no = next((n for n, t in prose if span[:30] in t), prose[0][0])
                    found.append({"where": f"{rel}:{line_no}", "words": _split(span[m.start():]),
                                  "needs": NEEDS in span})
            prose.clear()

        while i < len(lines):
            line, line_no = lines[i], i + 1
            if line.lstrip().startswith("```"):
                flush_prose()
                fenced = not fenced
                i += 1
                continue
            if fenced:
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                for m in COMMAND.finditer(line):
                    found.append({"where": f"{rel}:{line_no}", "words": _split(line[m.start():]),
                                  "needs": NEEDS in line})
            elif line.strip():
                prose.append((line_no, line))
            else:
                flush_prose()
            i += 1
        flush_prose()
    return found


def config_fields(root: str) -> list[tuple[str, str]]:
    """(where, FIELD) of every `--config.FIELD` the pages name (but the misspelt one an example
    of the "unknown field" error quotes)."""
    out = []
    for path in pages(root):
        rel = os.path.relpath(path, root)
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            out.extend((f"{rel}:{n}", m.group(1).rstrip(".")) for m in FIELD.finditer(line)
                       if not line[:m.start()].endswith("unknown field "))
    return out


# -- parsing one command, stopping before it runs ---------------------------------------------

class Parsed(Exception):
    """Raised by the patched parsers once a command's arguments parsed."""


def _patch_parsers():
    import argparse

    from absl import app
    original_args, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []

    def parse_args(self, args=None, namespace=None):
        inside.append(True)
        try:
            original_args(self, args, namespace)  # unknown arguments are its error
        finally:
            inside.pop()
        raise Parsed()

    def parse_known_args(self, args=None, namespace=None):
        out = original_known(self, args, namespace)
        if inside:
            return out
        raise Parsed()  # a command that parses known arguments itself (and checks the rest)

    def run(main, argv=None, flags_parser=None):
        flags_parser(list(sys.argv if argv is None else argv))
        raise Parsed()

    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    app.run = run


LIMIT_S = 120  # importing and loading a config takes seconds; more means the command went past its parser


def _too_long(*_):
    raise TimeoutError()


def parse_one(root: str, words: list[str]) -> str | None:
    """None if `words` (`python -m MODULE ARGS` or `python benchmarks/X.py ARGS`) parse with the
    command's own parser; else what went wrong."""
    import runpy

    from absl import flags
    before, environ, argv = set(flags.FLAGS), dict(os.environ), sys.argv
    err = io.StringIO()
    try:
        if words[1] == "-m":
            sys.argv = [words[2], *words[3:]]
            run = lambda: runpy.run_module(words[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [words[1], *words[2:]]
            # As `python path/script.py` does: the script's folder first on the import path.
            script = os.path.join(root, words[1])
            sys.path.insert(0, os.path.dirname(script))
            run = lambda: runpy.run_path(script, run_name="__main__")
        signal.signal(signal.SIGALRM, _too_long)
        signal.alarm(LIMIT_S)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            run()
        return "ran past its argument parsing (no argparse or absl parser was reached)"
    except Parsed:
        return None
    except TimeoutError:
        return f"did not reach its argument parser within {LIMIT_S} s (it may have started working)"
    except SystemExit as e:
        return f"exit {e.code}: {err.getvalue().strip()[-500:]}"
    except Exception as e:  # an import or config error
        return f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        if words[1] != "-m":
            sys.path.remove(os.path.dirname(os.path.join(root, words[1])))
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    sys.path.insert(0, root)
    _patch_parsers()
    for words in json.load(sys.stdin):
        error = parse_one(root, words)
        print(json.dumps({"ok": error is None, "error": error}), flush=True)


if __name__ == "__main__":
    main()
