"""``mythos serve``: transformers' OpenAI-compatible server (``transformers serve``) for a Mythos checkpoint.

``transformers serve DIR`` cannot load this model by itself (checked on transformers 5.24):

- without ``import openmythos`` nothing knows ``model_type="mythos"``, so no tokenizer is found for DIR;
- even with the Auto classes registered (or ``--trust-remote-code`` on an exported folder), the server looks the
  model class up by name in the ``transformers`` namespace (``getattr(transformers, config.architectures[0])``), where
  a plugin's class is not.

So this launcher registers the Auto classes, makes ``transformers.MythosForCausalLM`` name our class, and then hands
every argument to transformers' own ``serve`` command unchanged: ``mythos serve DIR --host 127.0.0.1 --port 8000``
takes exactly the options of ``transformers serve``.

A request chooses its depth with the ``generation_config`` field that transformers serve accepts (a JSON string):
``{"generation_config": "{\\"n_loops\\": 2}"}``. ``n_loops``, ``exit_criterion`` and ``exit_threshold`` in a
generation config reach ``MythosForCausalLM.generate`` (see ``GENERATION_LOOP_FIELDS`` in modeling_mythos.py).
docs/serving.md says what works and what does not.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

SERVE_DEPENDENCIES = ("fastapi", "uvicorn", "openai", "pydantic", "starlette", "rich")


def missing_serve_dependencies() -> list[str]:
    return [name for name in SERVE_DEPENDENCIES if importlib.util.find_spec(name) is None]


def expose_to_transformers_serve():
    """Register the Auto classes and bind ``transformers.MythosForCausalLM``, the name transformers serve looks up."""
    from . import _load

    _load()
    from .modeling_mythos import MythosForCausalLM

    # Imported only now: loading the stack can replace the `transformers` entry of sys.modules (seen in the `mythos`
    # command), and the server reads the name from the module it imports, i.e. the current entry.
    import transformers

    setattr(transformers, MythosForCausalLM.__name__, MythosForCausalLM)


def _answer_refused_requests_with_400():
    """A request the model refuses (a ValueError, e.g. ``n_loops=0`` or an exit criterion it cannot run) gets a 400
    with the model's message; transformers serve would answer a bare 500 "Internal Server Error"."""
    from fastapi.responses import JSONResponse
    from transformers.cli.serving import server

    build_server = server.build_server
    if getattr(build_server, "_mythos_refusals", False):
        return

    def build_server_with_refusals(*args, **kwargs):
        app = build_server(*args, **kwargs)

        @app.exception_handler(ValueError)
        async def refused(_request, error: ValueError):
            return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error"}}, status_code=400)

        return app

    build_server_with_refusals._mythos_refusals = True
    server.build_server = build_server_with_refusals  # Serve() imports it by name when it starts


def _refuse_request_depth_with_continuous_batching():
    """With ``--continuous-batching``, transformers serve (5.23, 5.24) builds its batching manager from the first
    request's generation config and passes later requests only ``max_new_tokens`` and ``eos_token_id``: a request's
    ``n_loops`` would be dropped, or silently become every later request's depth. Refuse such a request instead."""
    from transformers.cli.serving.utils import BaseHandler

    from .modeling_mythos import GENERATION_LOOP_FIELDS

    build = BaseHandler._build_generation_config
    if getattr(build, "_mythos_refusals", False):
        return

    def build_generation_config(self, body, model_generation_config, use_cb=False):
        if use_cb and body.get("generation_config") is not None:
            asked = [name for name in GENERATION_LOOP_FIELDS if name in json.loads(body["generation_config"])]
            if asked:
                raise ValueError(
                    f"{', '.join(f'`{name}`' for name in asked)} in a request's generation_config cannot be honoured "
                    f"with --continuous-batching: transformers serve passes each request only max_new_tokens and "
                    f"eos_token_id. Serve without --continuous-batching for per-request depth, or set the depth for "
                    f"every request with the checkpoint's config n_loops")
        return build(self, body, model_generation_config, use_cb=use_cb)

    build_generation_config._mythos_refusals = True
    BaseHandler._build_generation_config = build_generation_config


def serve(argv: list[str]) -> int:
    """Run ``transformers serve`` with ``argv`` (its own options) after making the Mythos classes loadable."""
    problem = _argument_problem(argv)
    if problem is not None:
        print(f"mythos serve: error: {problem}", file=sys.stderr)
        return 2
    missing = missing_serve_dependencies()
    if missing:
        print(f"mythos serve: error: missing {', '.join(missing)}; install them with "
              f"pip install \"openmythos[serve]\"", file=sys.stderr)
        return 2
    expose_to_transformers_serve()
    _answer_refused_requests_with_400()
    _refuse_request_depth_with_continuous_batching()
    from transformers.cli.transformers import app

    # typer exits through SystemExit with the command's status; `--help` and option errors are its own.
    try:
        app(["serve", *argv], prog_name="mythos")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except (ValueError, OSError) as error:  # a setting transformers refused while starting (--dtype, --device, ...)
        print(f"mythos serve: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


# numeric options of transformers serve that it takes without a range check: (accepted range as words, test)
NUMERIC_OPTIONS = {
    "--port": ("from 1 to 65535", lambda v: v == int(v) and 1 <= v <= 65535),
    "--model-timeout": ("-1 (never unload) or a number of seconds >= 0", lambda v: v == int(v) and (v == -1 or v >= 0)),
    "--cb-max-memory-percent": ("a fraction in (0, 1]", lambda v: 0 < v <= 1),
    "--cb-block-size": ("an integer >= 1", lambda v: v == int(v) and v >= 1),
    "--cb-num-blocks": ("an integer >= 1", lambda v: v == int(v) and v >= 1),
    "--cb-max-batch-tokens": ("an integer >= 1", lambda v: v == int(v) and v >= 1),
}


def _argument_problem(argv: list[str]) -> str | None:
    """The refusals transformers would turn into a traceback, a wrong port or a silent misbehaviour: a model path
    that is not a folder (taken for a Hub repo id), wherever it stands among the options, and a numeric option out of
    its range (:data:`NUMERIC_OPTIONS`). A value that is not a number is left to transformers' own message."""
    for i, token in enumerate(argv):
        follows_option = i > 0 and argv[i - 1].startswith("-") and "=" not in argv[i - 1]
        if not token.startswith("-") and not follows_option and token.startswith(("/", "./", "../", "~")) \
                and not Path(token).expanduser().is_dir():
            return (f"{token!r} is not a folder; pass a save_pretrained folder (with its tokenizer) or a Hub repo "
                    f"id")
        name, joined, value = token.partition("=")
        if name not in NUMERIC_OPTIONS:
            continue
        if not joined:  # "--port 8000": the value is the next token
            value = argv[i + 1] if i + 1 < len(argv) else None
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        accepted, holds = NUMERIC_OPTIONS[name]
        if not math.isfinite(number) or not holds(number):
            return f"{name} must be {accepted}, got {value}"
    return None


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
