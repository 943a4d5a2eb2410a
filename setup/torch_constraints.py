"""Print pip constraints that keep the installed torch and pin the triton it was built with.

Used by setup/create_env.sh so that installing lingua never replaces a user's torch (a CUDA
build, a nightly) and never pulls a triton the installed torch cannot use.
"""

import importlib.metadata as metadata
import re

# torch (major, minor) -> the triton release its CUDA wheels require. CPU wheels declare no
# triton requirement, so this table is the fallback when the metadata names none.
TRITON_FOR_TORCH = {
    (2, 6): "3.2.0",
    (2, 7): "3.3.1",
    (2, 8): "3.4.0",
    (2, 9): "3.5.0",
    (2, 10): "3.5.1",
    (2, 11): "3.6.0",
    (2, 12): "3.6.0",
    (2, 13): "3.7.1",
}


def triton_pin(torch_version: str, requirements: list[str]) -> str | None:
    """The triton version torch requires, from its metadata if present, else from the table."""
    for requirement in requirements:
        match = re.match(r"^(pytorch-)?triton\s*==\s*([\w.+]+)", requirement)
        if match:
            return match.group(2)
    major, minor = (int(part) for part in torch_version.split(".")[:2])
    return TRITON_FOR_TORCH.get((major, minor))


def main() -> None:
    version = metadata.version("torch")
    print(f"torch=={version}")
    pin = triton_pin(version, metadata.requires("torch") or [])
    if pin:
        print(f"triton=={pin}")


if __name__ == "__main__":
    main()
