"""Write tests/data/edm_reference.safetensors from NVlabs/edm's own code (not run by the tests).

Run outside the repository, in a folder holding NVlabs/edm's ``training/``, ``torch_utils/`` and
``dnnlib/`` (e.g. ``git archive HEAD training torch_utils dnnlib | tar x``):

    python /path/to/repo/tests/data/make_edm_reference.py /path/to/repo

For each case of ``tests/test_edm_networks.py::REFERENCE_CASES`` it builds EDM's preconditioner,
sets the deterministic formula weights, and stores the inputs and EDM's outputs D (and, for
conditional cases, the unconditional D; for iDDPM the ``u`` buffer). No weights are stored.
"""

import json
import os
import sys
from pathlib import Path

import torch

repo = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(repo / "tests"))
sys.path.insert(0, str(repo))
sys.path.insert(0, os.getcwd())  # EDM's training/, torch_utils/, dnnlib/
from safetensors.torch import save_file  # noqa: E402
from test_edm_networks import REFERENCE_CASES, formula_state_dict, reference_inputs  # noqa: E402
from training import networks  # noqa: E402  (EDM's module, from the current folder)

tensors, cases = {}, {}
for case, (precond, kwargs) in REFERENCE_CASES.items():
    model = getattr(networks, precond)(**kwargs)
    formula_state_dict(model)
    model.eval()
    inputs = reference_inputs(case, kwargs)
    label_dim = kwargs.get("label_dim", 0)
    one_hot = torch.nn.functional.one_hot(inputs["labels"], label_dim).float() if label_dim else None
    extra = {"augment_labels": inputs["augment_labels"]} if "augment_labels" in inputs else {}
    with torch.no_grad():
        tensors[f"{case}.D"] = model(inputs["x"], inputs["sigma"], one_hot, **extra)
        if label_dim:
            tensors[f"{case}.D_uncond"] = model(inputs["x"], inputs["sigma"], None, **extra)
    if precond == "iDDPMPrecond":
        tensors[f"{case}.u"] = model.u.clone()
    for k, v in inputs.items():
        tensors[f"{case}.{k}"] = v.contiguous()
    cases[case] = [precond, kwargs]
    print(case, {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(case)})
out = repo / "tests" / "data" / "edm_reference.safetensors"
save_file(tensors, str(out), metadata={"cases": json.dumps(cases), "source": "NVlabs/edm training/networks.py @ 008a4e5"})
print("wrote", out, out.stat().st_size, "bytes")
