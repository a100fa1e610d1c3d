"""How the twin's MoE routes: every router steered so that each MoE layer has an expert that gets no
token and one that gets most of them, the same on both sides of the proof (``steer_routing``), and,
after the first step, which experts got no token (``idle_experts``: the verdict's ``routing``).
"""

from __future__ import annotations


def steer_routing(model) -> dict:
    """MoE twins route on purpose: every router's input is shifted (a forward pre-hook) along the
    direction that raises the first expert's logit by about twice its spread and lowers the last
    expert's far below every other, for any token -- so in every MoE layer the last expert gets no
    token and the first gets most of them.  Registered before the sharded model is copied from this
    one, so both sides route alike.  (Left to chance, whether some expert got no token varied with
    the seed.)  A router is a 2-D weight [experts, hidden] outside the experts; {} where none is found."""
    import torch

    from tpplan.model.shrink import EXPERT_KEYS

    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = vars(text) if text is not None else {}
    experts = next((values[k] for k in EXPERT_KEYS if isinstance(values.get(k), int)), None)
    hidden = values.get("hidden_size")
    if not experts or experts < 3:
        return {}
    steered, drawn = [], 0
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if (weight is None or weight.ndim != 2 or weight.shape[0] != experts or "experts" in name.split(".")
                or (isinstance(hidden, int) and weight.shape[1] != hidden)):
            continue
        if not weight.detach().any():  # a router initialised to zero (Afmoe): every token would tie
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
            drawn += 1
        rows = weight.detach().float()
        spread = rows.norm(dim=1).max().item()
        target = torch.zeros(experts)
        target[0], target[-1] = 2 * spread, -4 * spread * rows.shape[1] ** 0.5
        shift = torch.linalg.pinv(rows) @ target  # rows @ shift == target
        module.register_forward_pre_hook(_shift_input(shift), with_kwargs=True)
        steered.append(name)
    if not steered:
        return {}
    return {"routers": len(steered), "experts": experts, "first": steered[0],
            "steered": f"expert 0 raised, expert {experts - 1} lowered below every other, in every router"
            + (f" ({drawn} initialised to zero, drawn from N(0, 0.02) first)" if drawn else "")}


def _shift_input(shift):
    def hook(module, args, kwargs):
        from torch.distributed.tensor import DTensor, Replicate

        def moved(x):
            if isinstance(x, DTensor):
                mesh = x.device_mesh
                whole = [Replicate()] * mesh.ndim
                return x + DTensor.from_local(shift.to(x.dtype), mesh, whole, run_check=False)
            return x + shift.to(x.dtype)

        if args:
            return (moved(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: moved(kwargs[key])}

    return hook


def idle_experts(ref_grads: dict, no_grad: list) -> dict:
    """Per expert bank, the experts whose unsharded gradient is zero in the first step (no token was
    routed to them): banks of 3-D weights [experts, ...] by their zero rows, lists of experts by a
    parameter without a gradient."""
    idle: dict[str, list] = {}
    for name, grad in ref_grads.items():
        if grad.ndim >= 3 and "experts" in name.split("."):
            rows = [i for i in range(grad.shape[0]) if not grad[i].any()]
            if rows:
                idle[name] = rows
    for name in no_grad:
        parts = name.split(".")
        at = parts.index("experts") + 1 if "experts" in parts else len(parts)
        if at < len(parts) and parts[at].isdigit():
            rows = idle.setdefault(".".join(parts[:at]), [])
            rows.append(int(parts[at])) if int(parts[at]) not in rows else None
    return idle
