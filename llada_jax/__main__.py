from llada_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
