"""Tier 1: a checkpoint of a model with LoRA adapters, exported as a peft adapter directory or merged into its base.

One tiny BERT classifier is wrapped with LoRA (meshplan.peft.lora_model), trained two steps and
checkpointed in this process. Its adapter directory must load with peft's own
``PeftModel.from_pretrained`` and its merged model with ``from_pretrained``, each giving the trained
model's logits; and a manifest altered to point elsewhere must be refused with a CheckpointError
(exit code 2 and one line from ``meshplan export``), leaving nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from peft import PeftModel
from peft.utils.save_and_load import get_peft_model_state_dict
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from meshplan.checkpoint import CheckpointError, export, save_training_state
from meshplan.checkpoint.manifest import MANIFEST
from meshplan.cli import main
from meshplan.peft import lora_model

TOKENS = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(2))
LABELS = torch.tensor([0, 1, 0, 1])


class _Holder(nn.Module):
    """A front end's module with the peft model inside it (as a LightningModule holds ``self.net``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def _base(folder: Path, hidden_size: int = 32) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, id2label={0: "negative", 1: "positive"})
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def _trained(base: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    """LoRA on the query and value layers (the head trains whole), two AdamW steps from the base on disk."""
    torch.manual_seed(1)
    model = lora_model(BertForSequenceClassification.from_pretrained(base), r=4, alpha=8, targets="q,v")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=TOKENS, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), optimizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The base directory, the trained peft model, its logits, and two checkpoints of it (never altered):
    ``flat`` saved as the model itself, ``nested`` inside another module."""
    folder = tmp_path_factory.mktemp("lora")
    base = _base(folder / "base")
    model, optimizer = _trained(base)
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    return {
        "base": base, "model": model, "logits": logits,
        "flat": save_training_state(folder / "flat", {"model": model}, {"optimizer": optimizer}, {}),
        "nested": save_training_state(folder / "nested", {"module": _Holder(model)}, {}, {}),
    }


@pytest.fixture
def checkpoint(trained: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the flat checkpoint for one test to alter."""
    return Path(shutil.copytree(trained["flat"], tmp_path / "step=2.ckpt"))


def _classifier_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


@pytest.mark.parametrize("saved", ["flat", "nested"])
def test_the_adapter_directory_loads_with_peft_and_gives_the_trained_logits(saved: str, trained: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    out = export(trained[saved], tmp_path / "adapter", base=trained["base"])
    assert sorted(path.name for path in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["base_model_name_or_path"] == str(trained["base"])
    loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(trained["base"]), str(out))
    assert torch.equal(_classifier_logits(loaded), trained["logits"])


def test_the_adapter_file_holds_exactly_what_peft_saves(trained: dict[str, Any], tmp_path: Path) -> None:
    out = export(trained["flat"], tmp_path / "adapter")
    expected = get_peft_model_state_dict(trained["model"])
    with safe_open(out / "adapter_model.safetensors", "pt") as file:
        assert sorted(file.keys()) == sorted(expected)
        for key in file.keys():
            assert torch.equal(file.get_tensor(key), expected[key]), key
    assert "base_model.model.classifier.weight" in expected  # the head, which trains whole, is part of the adapter


@pytest.mark.parametrize("given_base", [True, False], ids=["base-given", "base-from-adapter-config"])
def test_merge_writes_a_whole_model_from_pretrained_loads(given_base: bool, trained: dict[str, Any], tmp_path: Path) -> None:
    # Without base=, the base is the adapter config's base_model_name_or_path: the directory the model was loaded from.
    out = export(trained["flat"], tmp_path / "merged", merge=True, base=trained["base"] if given_base else None)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(merged) is BertForSequenceClassification and merged.config.id2label == {0: "negative", 1: "positive"}
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(_classifier_logits(merged), trained["logits"], atol=1e-5, rtol=0)


def test_merge_through_the_cli(trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(trained["nested"]), str(tmp_path / "merged"), "--merge", "--base", str(trained["base"])]) == 0
    assert "load it with from_pretrained" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_classifier_logits(merged), trained["logits"], atol=1e-5, rtol=0)
    assert main(["export", str(trained["nested"]), str(tmp_path / "adapter")]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out


def test_merge_of_a_whole_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = BertForSequenceClassification.from_pretrained(_base(tmp_path / "base"))
    whole = save_training_state(tmp_path / "whole", {"model": model}, {}, {})
    _export_refused(whole, tmp_path, capsys, ["--merge"], "holds a whole model, not an adapter")
    assert export(whole, tmp_path / "exported").joinpath("model.safetensors").is_file()  # without --merge: as ever


def test_merge_without_a_base_it_can_find_asks_for_base(checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _edit_adapter(checkpoint, lambda adapter: adapter["config"].__setitem__("base_model_name_or_path", "org/some-model"))
    _export_refused(checkpoint, tmp_path, capsys, ["--merge"], "'org/some-model'", "pass --base DIR")
    _export_refused(checkpoint, tmp_path, capsys, ["--merge", "--base", str(tmp_path / "none")], "is not a directory")


def test_merge_onto_another_base_is_refused(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = _base(tmp_path / "wider", hidden_size=48)
    _export_refused(checkpoint, tmp_path, capsys, ["--merge", "--base", str(other)], "does not take this checkpoint's adapter")


def test_merge_takes_the_architecture_from_the_base_not_the_manifest(checkpoint: Path, trained: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    # A manifest whose config asks for layers of 10^7 units would have the merge allocate gigabytes.
    _edit_manifest(checkpoint, lambda manifest: manifest["models"]["model"][0]["config"].__setitem__("intermediate_size", 10**7))
    merged = AutoModelForSequenceClassification.from_pretrained(export(checkpoint, tmp_path / "merged", merge=True))
    assert merged.config.intermediate_size == 64
    torch.testing.assert_close(_classifier_logits(merged), trained["logits"], atol=1e-5, rtol=0)


def _edit_manifest(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _edit_adapter(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    _edit_manifest(path, lambda manifest: edit(manifest["adapters"]["model"]["peft_models"][0]))


def _export_refused(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], *fragments: str) -> None:
    """``meshplan export`` of ``path``: exit code 2, one line on stderr naming each fragment, nothing left behind."""
    out = tmp_path / "exported"
    capsys.readouterr()  # what building the checkpoint printed
    assert main(["export", str(path), str(out), *options]) == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and error.startswith("meshplan export: "), error
    for fragment in fragments:
        assert fragment in error, error
    assert not out.exists() and not list(tmp_path.glob(".exported*"))
    with pytest.raises(CheckpointError):  # the same refusal from the function
        export(path, out, merge="--merge" in options, base=options[-1] if "--base" in options else None)


def _first_weight(adapter: dict[str, Any]) -> str:
    return next(iter(adapter["weights"]))


def _second_adapter(manifest: dict[str, Any]) -> None:
    models = manifest["adapters"]["model"]["peft_models"]
    models.append({**models[0], "adapter": "other"})


# Each: an edit of the manifest, the options of `meshplan export`, and what the refusal must say.
HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], Any], list[str], str]] = {
    "weight naming an optimizer state": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["weights"].__setitem__(
            "base_model.model.classifier.weight", next(key for key in m["tensors"] if key.endswith("/exp_avg"))),
        [], "not a tensor of the model 'model'"),
    "weight naming no tensor": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["weights"].__setitem__("x.weight", "model/nowhere"),
        [], "names 'model/nowhere', not a tensor of this checkpoint"),
    "file key of the safetensors header": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["weights"].__setitem__(
            "__metadata__", "model/base_model.model.classifier.modules_to_save.default.bias"),
        [], "__metadata__ cannot name a tensor"),
    "no weights": (lambda m: m["adapters"]["model"]["peft_models"][0].__setitem__("weights", {}), [], "lists no adapter weights"),
    "unknown peft type": (lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("peft_type", "EVIL"),
                          [], "peft_type 'EVIL' is no peft method"),
    "task type not a string": (lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("task_type", ["x"]),
                               [], "task_type ['x'] is none of peft's task types"),
    "config not an object": (lambda m: m["adapters"]["model"]["peft_models"][0].__setitem__("config", "LORA"),
                             [], "['config'] is 'LORA', not an object"),
    "base path not a string": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("base_model_name_or_path", 7),
        [], "base_model_name_or_path is 7, not a path"),
    "two adapters on one model": (_second_adapter, [], "holds 2 adapters ('default', 'other')"),
    "adapters on another model": (lambda m: m["adapters"]["model"]["peft_models"][0].__setitem__("prefix", "elsewhere."),
                                  [], "none of them is on its Hugging Face model"),
    "class outside transformers' models": (lambda m: m["models"]["model"][0].__setitem__("class", "Trainer"),
                                           ["--merge"], "'Trainer' is no transformers PreTrainedModel"),
    "class that is a private name": (lambda m: m["models"]["model"][0].__setitem__("class", "__loader__"),
                                     ["--merge"], "'__loader__' is no transformers PreTrainedModel"),
    "merge of another peft type": (lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("peft_type", "IA3"),
                                   ["--merge"], "merges LoRA adapters only"),
    "merge of an init that changes the base": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("init_lora_weights", "pissa"),
        ["--merge"], "init_lora_weights='pissa', which changes the base weights"),
    "merge with more labels than the head has rows": (
        lambda m: m["models"]["model"][0]["config"].__setitem__("id2label", {str(i): f"l{i}" for i in range(10**5)}),
        ["--merge"], "names 100000 labels, more than any trained tensor has rows (32)"),
    "merge with labels that are not names": (lambda m: m["models"]["model"][0]["config"].__setitem__("id2label", {"0": 1}),
                                             ["--merge"], "id2label is {'0': 1}, not label numbers and names"),
    "merge with a rank larger than the weights": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("r", 10**9),
        ["--merge"], "r=1000000000, rank_pattern={}: each must be a whole number from 1 to the rows of its largest"),
    "merge with a rank pattern that is no number": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("rank_pattern", {"query": "4"}),
        ["--merge"], "rank_pattern={'query': '4'}"),
    "merge of a LoRA variant": (lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("use_qalora", True),
                                ["--merge"], "sets use_qalora=True; --merge merges plain LoRA only"),
    "merge with a target pattern that is no regular expression": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("target_modules", "("),
        ["--merge"], "target_modules='('"),
    "merge with modules_to_save that are no names": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("modules_to_save", {"a": 1}),
        ["--merge"], "modules_to_save={'a': 1}"),
    "merge of the PreTrainedModel base class": (lambda m: m["models"]["model"][0].__setitem__("class", "PreTrainedModel"),
                                                ["--merge"], "'PreTrainedModel' is no transformers PreTrainedModel"),
    "merge with an adapter weight missing": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["weights"].pop(
            next(key for key in m["adapters"]["model"]["peft_models"][0]["weights"] if ".lora_B." in key)),
        ["--merge"], "the adapter lacks 1 of its tensors"),
    "merge of a config that imports a module": (
        lambda m: m["adapters"]["model"]["peft_models"][0]["config"].__setitem__("megatron_config", {"x": 1}),
        ["--merge"], "sets megatron_config"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_adapter_entry_is_refused(case: str, checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    edit, options, expected = HOSTILE[case]
    _edit_manifest(checkpoint, edit)
    _export_refused(checkpoint, tmp_path, capsys, options, expected)
