"""The `citadel-llm` command: serve, the three process roles, demo-model, config show."""

from __future__ import annotations

import argparse
import os
import sys

from service.engine.lean_imports import skip_unused_modules

# vLLM's EngineCore is a spawned child that runs this module (the main module of the engine
# worker, or imported by the console script) before it imports vLLM: keep out what it won't use.
skip_unused_modules()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citadel-llm", description="Efficient Phi-3-mini serving on vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the engine worker, gateway and orchestrator, restarting any that dies"),
        ("engine", "run the vLLM engine worker process"),
        ("gateway", "run the HTTP gateway process"),
        ("orchestrator", "run the efficiency orchestrator process"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", help="YAML configuration file (default: $PHI_3_MINI_CONFIG)")
    demo = sub.add_parser("demo-model", help="write a random-weight Phi-3 model: the small demo one, or full size")
    demo.add_argument("dir")
    demo.add_argument("--size", choices=("small", "full"), default="small",
                      help="small (default): 2 layers; full: Phi-3-mini-4k-instruct's exact configuration")
    demo.add_argument("--quantization", choices=("gptq",), help="full size: 4-bit GPTQ, group 128, symmetric")
    demo.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="full size (default: bfloat16)")
    demo.add_argument("--config-only", action="store_true", help="full size: only config and tokenizer files")
    demo.add_argument("--seed", type=int, default=0)
    model = sub.add_parser("model", help="model files: download, verify, import a GGUF file")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    for name, help_text in (("download", "fetch model_name into model_path and write model.sha256"),
                            ("verify", "check the model folder against its model.sha256")):
        cmd = model_sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", help="YAML configuration file")
        cmd.add_argument("--dir", help="the model folder (default: model_path)")
    gguf = model_sub.add_parser("import-gguf", help="convert a GGUF file (llama.cpp, Ollama) to a model folder vLLM serves")
    gguf.add_argument("file", help="the .gguf file")
    gguf.add_argument("dir", help="the new model folder (written beside it, then renamed)")
    gguf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="dtype of the dequantized weights (default: float32, which every CPU runs)")
    config = sub.add_parser("config", help="configuration commands")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the configuration in force")
    show.add_argument("--config", help="YAML configuration file")
    show.add_argument("--format", choices=("yaml", "json"), default="yaml")
    return parser


def _title(role: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(f"citadel-llm {role}")
    except ImportError:
        pass


# Processes that never import vLLM or transformers. structlog imports rich (and pygments),
# ~5 MB per process, for tracebacks it renders only on a terminal; these do without.
_LIGHT_ROLES = frozenset({"serve", "gateway", "orchestrator"})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in _LIGHT_ROLES and "rich" not in sys.modules:
        sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` now fails: structlog goes without
    from shared.config import ConfigError, load_config, to_sections
    from shared.logging import configure_logging

    if args.command == "demo-model" and args.size == "full":
        from service.full_size_model import run_cli

        return run_cli(args)
    if args.command == "demo-model":
        if args.quantization or args.dtype or args.config_only:
            print("citadel-llm: --quantization, --dtype and --config-only go with --size full", file=sys.stderr)
            return 2
        from service.demo_model import make_demo_model

        print(make_demo_model(args.dir, seed=args.seed))
        return 0
    if args.command == "model" and args.model_command == "import-gguf":
        return _import_gguf(args)
    if getattr(args, "config", None):
        os.environ["PHI_3_MINI_CONFIG"] = os.path.abspath(args.config)  # children inherit it
    try:
        config = load_config()
    except (ConfigError, OSError) as exc:
        print(f"citadel-llm: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        import msgspec

        sections = to_sections(config)
        if args.format == "json":
            print(msgspec.json.format(msgspec.json.encode(sections).decode()))
        else:
            import yaml

            print(yaml.safe_dump(sections, sort_keys=False), end="")
        return 0
    if args.command == "model":
        return _model_command(args, config)
    role = args.command
    configure_logging(config.log_level, role)
    _title(role)
    if role == "serve":
        from service.supervisor import run_serve

        return run_serve(config, os.environ.get("PHI_3_MINI_CONFIG"))
    if role == "engine":
        from service.engine.main import run_engine

        code = run_engine(config)
        # Everything is shut down and flushed by now; skipping interpreter teardown avoids
        # vLLM's AsyncLLM.__del__ running against half-torn-down modules.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if role == "gateway":
        from service.gateway.app import run_gateway

        return run_gateway(config)
    from orchestrator.main import run_orchestrator

    return run_orchestrator(config)


def _model_command(args: argparse.Namespace, config: object) -> int:
    from service import model_files

    model_dir = args.dir or config.model_path  # type: ignore[attr-defined]
    if args.model_command == "download":
        name = config.model_name  # type: ignore[attr-defined]
        try:
            manifest = model_files.download(name, model_dir)
        except model_files.DownloadError as exc:
            print(f"citadel-llm: model download failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("citadel-llm: model download interrupted; run it again to resume", file=sys.stderr)
            return 130
        print(f"downloaded {name} to {model_dir}; wrote {manifest}")
        return 0
    problems = model_files.verify(model_dir)
    if problems:
        for problem in problems:
            print(f"FAILED {problem}", file=sys.stderr)
        return 1
    print(f"{model_dir}: OK")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from service.gguf_import import GGUFImportError, import_gguf

    try:
        manifest = import_gguf(args.file, args.dir, args.dtype)
    except GGUFImportError as exc:
        print(f"citadel-llm: {exc}", file=sys.stderr)
        return 2
    print(f"imported {args.file} to {args.dir}; wrote {manifest}")
    return 0


if __name__ == "__main__":  # `python -m service.cli ROLE`, as `serve` starts its children
    raise SystemExit(main())
