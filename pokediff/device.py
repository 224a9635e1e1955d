"""Device names from the command line: "auto" picks CUDA when present; asking for CUDA without it is an error."""

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device '{name}' is not a device name (auto | cpu | cuda | cuda:N): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device '{name}' was asked for but CUDA is not available on this machine; use 'cpu' or 'auto'"
        )
    return device
