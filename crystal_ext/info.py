"""`python -m crystal_ext.info`: print how the extension was built and what can run here."""

import json

from crystal_ext.ops import build_info


def main() -> None:
    print(json.dumps(build_info(), indent=2))


if __name__ == "__main__":
    main()
