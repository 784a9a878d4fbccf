"""``python -m reclip_core {hypothesis,train,evaluate,segment} --config NAME [--set k=v ...]``."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
