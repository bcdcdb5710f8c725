"""A checkpoint becomes a servable run directory whose adapter is the checkpoint's tensors under PEFT's names."""

from __future__ import annotations

from safetensors.torch import load_file

from tunelab.service.checkpoint_models import checkpoint_run, peft_name, split_checkpoint_name


def test_names_split_into_the_model_and_the_step():
    assert split_checkpoint_name("ft:base:p:s:abc:ckpt-step-40") == ("ft:base:p:s:abc", 40)
    assert split_checkpoint_name("ft:base:p:s:abc") is None
    assert split_checkpoint_name("bank@production") is None
    assert peft_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight") == (
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")


def test_the_last_checkpoint_served_is_the_final_adapter(trained_run):
    from tunelab.rundir import finished
    from tunelab.training.checkpoint import complete_checkpoints

    last = complete_checkpoints(trained_run.path)[-1]
    step = int(last.name.removeprefix("step-"))
    served = checkpoint_run(trained_run.path, step)
    finished(served)  # a whole run directory: its manifest written last
    assert served.name.startswith(".")  # beside the run, hidden from the worker's search for its run
    ours = load_file(served / "adapter" / "adapter_model.safetensors")
    final = load_file(trained_run.path / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == final.keys() and all(ours[k].equal(final[k]) for k in ours)
    assert checkpoint_run(trained_run.path, step) == served  # made once
    assert checkpoint_run(trained_run.path, 10**6) is None
