"""Tier 1: recipes and DeepSpeed files are untrusted input (issue 16, item 6).

Each crafted file is refused with a PlanError whose message is one short line naming the file
and the key or limit at fault; nothing expands an alias bomb, hangs on a FIFO, reads a huge
file, or lets NaN, infinity or a negative count through.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from accelerate.commands.config.config_args import load_config_from_file

import meshplan
from meshplan import DDP, PlanError, ZeRO
from meshplan.errors import shown
from meshplan.recipes import (
    CATALOGUE_DIR, MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES, RECIPE_VARIABLE, launched_recipe_extras, read_recipe,
)

# The classic "billion laughs": nine levels of nine aliases, 9^9 strings once expanded.
ALIAS_BOMB = "\n".join(
    ['lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]" for previous, name in zip("abcdefgh", "bcdefghi")]
    + ["distributed_type: *i", ""]
)
# A thousand aliases of a thousand-element list: a million values, a 9 MB message if printed.
MILLION = ("x: &x [" + ", ".join(["1"] * 1000) + "]\n"
           "distributed_type: [" + ", ".join(["*x"] * 1000) + "]\n")


def _write(tmp_path: Path, text: str | bytes, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _refusal(path: Path) -> str:
    """The message read_recipe refuses ``path`` with, checked to be one short line naming the file."""
    with pytest.raises(PlanError) as error:
        read_recipe(path)
    message = str(error.value)
    assert "\n" not in message and len(message) < 500, message
    assert path.name in message
    return message


@contextmanager
def _no_hang(seconds: int = 20) -> Iterator[None]:
    """Fails the test, instead of hanging the suite, when the body blocks."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- Cost bounded by the file's size, nodes and depth ---

def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = _write(tmp_path, ALIAS_BOMB)
    assert path.stat().st_size < 600
    assert f"more than {MAX_VALUES} values" in _refusal(path)


def test_a_million_aliased_values_are_refused_with_a_short_message(tmp_path: Path) -> None:
    assert f"more than {MAX_VALUES} values" in _refusal(_write(tmp_path, MILLION))


def test_a_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    assert f"nests deeper than {MAX_DEPTH} levels" in _refusal(_write(tmp_path, "distributed_type: &a [*a]\n"))


def test_a_few_aliases_in_a_real_recipe_still_read(tmp_path: Path) -> None:
    path = _write(tmp_path, "distributed_type: &layout MULTI_GPU\nmixed_precision: &precision bf16\n"
                            "num_processes: 4\n")
    assert meshplan.from_recipe(path) == DDP(mixed_precision="bf16")


def test_a_yaml_merge_key_is_refused(tmp_path: Path) -> None:
    # "<<: [*a, *a, ...]" copies every pair of every mapping it names: quadratic in the file.
    path = _write(tmp_path, "base: &a {num_processes: 2}\nother: {<<: [*a, *a]}\n")
    assert "merge key ('<<') at line 2" in _refusal(path)


@pytest.mark.parametrize("text", [
    "distributed_type: " + "[" * 100_000 + "]" * 100_000 + "\n",  # past Python's recursion limit
    "distributed_type: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n",
    "distributed_type: " + "{a: " * 100_000 + "1" + "}" * 100_000 + "\n",
], ids=["sequences-100000", f"sequences-{MAX_DEPTH + 1}", "mappings-100000"])
def test_deep_nesting_is_refused(text: str, tmp_path: Path) -> None:
    assert f"nests deeper than {MAX_DEPTH} levels" in _refusal(_write(tmp_path, text))


def test_deep_nesting_in_the_header_is_refused(tmp_path: Path) -> None:
    header = '# meshplan: {"tp_plan": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    message = _refusal(_write(tmp_path, header + "distributed_type: MULTI_GPU\n"))
    assert "'# meshplan:' line nests deeper" in message


def test_many_values_in_the_header_are_refused(tmp_path: Path) -> None:
    header = '# meshplan: {"tp_plan": [' + ", ".join(["1"] * (MAX_VALUES + 1)) + "]}\n"
    message = _refusal(_write(tmp_path, header + "distributed_type: MULTI_GPU\n"))
    assert f"'# meshplan:' line holds more than {MAX_VALUES} values" in message


def test_many_yaml_nodes_are_refused_while_parsing(tmp_path: Path) -> None:
    path = _write(tmp_path, "distributed_type: [" + ", ".join(["1"] * 100_000) + "]\n")
    assert f"more than {MAX_VALUES} YAML values" in _refusal(path)


def test_a_file_larger_than_the_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as file:
        file.truncate(1 << 30)  # 1 GiB, sparse: reading it would take the memory and the time
    assert f"is {1 << 30} bytes; the limit is {MAX_FILE_BYTES} bytes" in _refusal(path)
    just_over = _write(tmp_path, "distributed_type: MULTI_GPU\n#" + "x" * MAX_FILE_BYTES + "\n", "over.yaml")
    assert f"the limit is {MAX_FILE_BYTES} bytes" in _refusal(just_over)


def test_a_fifo_recipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)  # nobody writes: a plain open() would wait forever
    with _no_hang():
        assert "is not a regular file" in _refusal(fifo)


def test_a_directory_or_a_device_is_refused(tmp_path: Path) -> None:
    assert "is not a regular file" in _refusal(tmp_path)
    assert "is not a regular file" in _refusal(Path("/dev/zero"))


# --- Bytes and numbers ---

def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "# caf\xe9 recipe\ndistributed_type: MULTI_GPU\n".encode("latin-1"))
    assert "is not UTF-8 text: byte 5 is 0xe9" in _refusal(path)


def test_a_5000_digit_integer_in_the_header_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, '# meshplan: {"bucket_cap_mb": ' + "9" * 5000 + "}\ndistributed_type: MULTI_GPU\n")
    assert "holds a number 5000 characters long" in _refusal(path)


def test_a_5000_digit_integer_in_the_yaml_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "distributed_type: MULTI_GPU\nnum_processes: " + "9" * 5000 + "\n")
    assert "holds a number 5000 characters long" in _refusal(path)


@pytest.mark.parametrize(("value", "shown_as"), [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("-1.0", "-1.0")])
def test_nan_infinity_and_negatives_in_the_yaml_are_refused_for_positive_options(value: str, shown_as: str,
                                                                               tmp_path: Path) -> None:
    path = _write(tmp_path, "distributed_type: DEEPSPEED\n"
                            f"deepspeed_config: {{zero_stage: 2, gradient_clipping: {value}}}\n")
    assert f"gradient_clipping={shown_as} must be a positive finite number" in _refusal(path)


@pytest.mark.parametrize(("header", "expected"), [
    ('{"bucket_cap_mb": NaN}', "holds NaN"),
    ('{"gradient_clipping": Infinity}', "holds Infinity"),
    ('{"gradient_clipping": -Infinity}', "holds -Infinity"),
    ('{"gradient_clipping": 1e999}', "'1e999', too large for a float"),
    ('{"bucket_cap_mb": -25}', "bucket_cap_mb=-25 must be a positive finite number"),
    ('{"bucket_cap_mb": true}', "bucket_cap_mb=True must be of type int or float"),
    ('{"gradient_accumulation_steps": 0}', "gradient_accumulation_steps=0 must be a positive finite number"),
])
def test_nan_infinity_negatives_and_bools_in_the_header_are_refused(header: str, expected: str, tmp_path: Path) -> None:
    path = _write(tmp_path, f"# meshplan: {header}\ndistributed_type: MULTI_GPU\n")
    assert expected in _refusal(path)


@pytest.mark.parametrize("build", [
    lambda: ZeRO(stage=2, gradient_clipping=float("nan")),
    lambda: ZeRO(stage=2, gradient_clipping=float("inf")),
    lambda: DDP(bucket_cap_mb=float("nan")),
    lambda: DDP(bucket_cap_mb=-1.5),
    lambda: ZeRO(stage=2, reduce_bucket_size=True),
    lambda: ZeRO(stage=3, stage3_max_live_parameters=-1),
], ids=["zero-clip-nan", "zero-clip-inf", "ddp-bucket-nan", "ddp-bucket-negative", "zero-bucket-bool",
        "zero3-live-negative"])
def test_strategies_built_in_python_get_the_same_checks(build) -> None:
    with pytest.raises(PlanError, match="must be"):
        build()


def test_a_huge_integer_option_built_in_python_is_shown_by_its_size() -> None:
    with pytest.raises(PlanError) as error:
        DDP(bucket_cap_mb=-(10 ** 5000))
    assert "bucket_cap_mb=<an integer of about 5001 digits> must be a positive finite number" in str(error.value)


# --- Counts and Accelerate's own values ---

@pytest.mark.parametrize(("line", "expected"), [
    ("num_processes: -4", "num_processes=-4 must be a positive integer"),
    ("num_processes: 0", "num_processes=0 must be a positive integer"),
    ("num_processes: 2.5", "num_processes=2.5 must be a positive integer"),
    ("num_processes: true", "num_processes=True must be a positive integer"),
    ("num_machines: 0", "num_machines=0 must be a positive integer"),
    ("num_machines: -2", "num_machines=-2 must be a positive integer"),
])
def test_negative_and_zero_counts_are_refused_not_made_one(line: str, expected: str, tmp_path: Path) -> None:
    assert expected in _refusal(_write(tmp_path, f"distributed_type: MULTI_GPU\n{line}\n"))


def test_num_processes_minus_one_is_left_to_the_launcher_as_in_accelerate(tmp_path: Path) -> None:
    # Accelerate's own default: `accelerate launch --num_processes N` must then give the count.
    recipe = read_recipe(_write(tmp_path, "distributed_type: MULTI_GPU\nnum_processes: -1\n"))
    assert recipe.num_processes is None and recipe.num_machines == 1


@pytest.mark.parametrize(("line", "expected"), [
    ("distributed_type: NO", "distributed_type is the YAML boolean false (an unquoted NO, no or off reads as false): "
                             "quote it, distributed_type: 'NO'."),
    ("distributed_type: 'NO'\nmixed_precision: no", "mixed_precision is the YAML boolean false"),
    ("distributed_type: 7", "distributed_type=7 is not a layout meshplan runs"),
])
def test_an_unquoted_no_says_to_quote_it(line: str, expected: str, tmp_path: Path) -> None:
    assert expected in _refusal(_write(tmp_path, line + "\n"))


def test_a_quoted_no_reads(tmp_path: Path) -> None:
    assert meshplan.from_recipe(_write(tmp_path, "distributed_type: 'NO'\nmixed_precision: 'no'\n")) == DDP()


@pytest.mark.parametrize(("text", "expected"), [
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2, offload_optimizer_device: [cpu]}",
     "deepspeed_config.offload_optimizer_device=['cpu'] is not honoured"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {deepspeed_config_file: [ds.json]}",
     "deepspeed_config.deepspeed_config_file=['ds.json'] must be a file name"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: '3'}",
     "deepspeed_config.zero_stage='3' must be an integer"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2, gradient_accumulation_steps: 2.5}",
     "deepspeed_config.gradient_accumulation_steps=2.5 must be an integer"),
    ("distributed_type: MULTI_GPU\nparallelism_config: {parallelism_config_tp_size: '2'}",
     "parallelism_config.parallelism_config_tp_size='2' must be an integer"),
    ("distributed_type: MULTI_GPU\nparallelism_config: {parallelism_config_cp_size: [2]}",
     "parallelism_config.parallelism_config_cp_size=[2] must be an integer"),
    ("distributed_type: MULTI_GPU\nparallelism_config: {parallelism_config_tp_size: -2}",
     "tp_size=-2 must be a positive"),
    ("distributed_type: MULTI_GPU\nparallelism_config: {7: 2}", "parallelism_config.7 is not one meshplan honours"),
    ("distributed_type: MULTI_GPU\n7: 2", "key 7 is not an Accelerate config key"),
    ("distributed_type: FSDP\nfsdp_config: [2]", "fsdp_config must be a mapping"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: '2'}", "fsdp_config.fsdp_version='2'"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: true}", "fsdp_config.fsdp_version=True"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2, fsdp_reshard_after_forward: 1}",
     "fsdp_config.fsdp_reshard_after_forward=1 must be true or false"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2, fsdp_offload_params: 'no'}",
     "fsdp_config.fsdp_offload_params='no' is not honoured"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2, fsdp_transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}",
     "fsdp_transformer_layer_cls_to_wrap=['LlamaDecoderLayer'] must be class names"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2, fsdp_state_dict_type: {a: 1}}",
     "fsdp_config.fsdp_state_dict_type={'a': 1} is not honoured"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2, 7: 1}", "fsdp_config.7 is not one meshplan honours"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2}\nparallelism_config: {parallelism_config_dp_shard_size: '2'}",
     "parallelism_config.parallelism_config_dp_shard_size='2' must be an integer"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2}\nparallelism_config: {parallelism_config_dp_shard_size: 0}",
     "parallelism_config_dp_shard_size=0 must be a positive integer"),
    ("# meshplan: [1]\ndistributed_type: MULTI_GPU", "the '# meshplan:' line must hold a JSON object"),
    ('# meshplan: {"no_such_option": 1}\ndistributed_type: MULTI_GPU', "option no_such_option=1 is unknown"),
    ('# meshplan: {"tp_plan": ["q_proj"], "tp_size": 2}\ndistributed_type: MULTI_GPU',
     "tp_plan=['q_proj'] is not a mapping"),
    ('# meshplan: {"tp_plan": {"q_proj": ["colwise"]}, "tp_size": 2}\ndistributed_type: MULTI_GPU',
     "tp_plan['q_proj']=['colwise'] is not a style"),
    ('# meshplan: {"tp_size": "2"}\ndistributed_type: MULTI_GPU', "tp_size='2' must be a positive integer"),
    ("distributed_type: 2001-13-45", "holds a value YAML cannot convert: month must be in 1..12"),
], ids=lambda value: value if len(value) < 30 else None)
def test_every_value_read_is_checked_by_type(text: str, expected: str, tmp_path: Path) -> None:
    assert expected in _refusal(_write(tmp_path, text + "\n"))


def test_long_values_keys_and_file_names_are_cut_in_messages(tmp_path: Path) -> None:
    long_value = _refusal(_write(tmp_path, "distributed_type: " + "x" * 100_000 + "\n"))
    assert "distributed_type='xxx" in long_value and "..." in long_value
    long_header_key = _refusal(_write(tmp_path, '# meshplan: {"' + "k" * 100_000 + '": 1}\n'
                                                "distributed_type: MULTI_GPU\n"))
    assert "option 'kkk" in long_header_key and "..." in long_header_key
    long_file = _refusal(_write(tmp_path, "distributed_type: DEEPSPEED\ndeepspeed_config: {deepspeed_config_file: "
                                          + "d" * 5000 + ".json}\n"))
    assert "DeepSpeed config '" in long_file and "cannot be opened: File name too long" in long_file


def test_shown_is_bounded_in_length_and_cost() -> None:
    assert len(shown("x" * 10 ** 6)) <= 80
    assert shown(10 ** 5000) == "<an integer of about 5001 digits>"
    assert len(shown([[10 ** 5000]] * 10 ** 6)) <= 80  # no ValueError, no million-element repr
    nested: list = []
    nested.append(nested)
    assert len(shown(nested)) <= 80


# --- DeepSpeed files named by a recipe ---

def _deepspeed_recipe(tmp_path: Path, content: str | bytes) -> Path:
    _write(tmp_path, content, "ds.json")
    return _write(tmp_path, "distributed_type: DEEPSPEED\ndeepspeed_config: {deepspeed_config_file: ds.json}\n")


@pytest.mark.parametrize(("content", "expected"), [
    ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": NaN}}', "holds NaN"),
    ('{"zero_optimization": {"stage": 2}, "gradient_clipping": Infinity}', "holds Infinity"),
    ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}}', "reduce_bucket_size=-5 must be a positive"),
    ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": ' + "7" * 5000 + "}}", "a number 5000 characters long"),
    ('{"zero_optimization": {"stage": "3"}}', "stage='3' is not a ZeRO stage"),
    ('{"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}',
     "zero_optimization.offload_optimizer='cpu' must be an object"),
    ('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": ["cpu"]}}}',
     "zero_optimization.offload_optimizer.device=['cpu'] is not honoured"),
    ('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": "yes"}}}',
     "zero_optimization.offload_optimizer.pin_memory='yes' must be true or false"),
    ('{"zero_optimization": {"stage": 2}, "bf16": true}', "key bf16=True must be an object"),
    ('{"zero_optimization": {"stage": 2}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests deeper than"),
    ('{"zero_optimization": {"stage": 2}, "x": [' + ", ".join(["0"] * (MAX_VALUES + 1)) + "]}", "more than"),
    (b'{"zero_optimization": {"stage": 2}, "\xff": 1}', "is not UTF-8 text"),
    ("[1, 2]", "must be a JSON object with a zero_optimization object"),
    ('{"zero_optimization": ', "is not valid JSON: Expecting value"),
], ids=lambda value: value if isinstance(value, str) and len(value) < 30 else None)
def test_a_deepspeed_file_is_untrusted_too(content: str | bytes, expected: str, tmp_path: Path) -> None:
    message = _refusal(_deepspeed_recipe(tmp_path, content))
    assert "ds.json" in message and expected in message


def test_a_deepspeed_file_that_is_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ds.json")
    recipe = _write(tmp_path, "distributed_type: DEEPSPEED\ndeepspeed_config: {deepspeed_config_file: ds.json}\n")
    with _no_hang():
        assert "DeepSpeed config" in _refusal(recipe) and "is not a regular file" in _refusal(recipe)
    device = _write(tmp_path, "distributed_type: DEEPSPEED\ndeepspeed_config: {deepspeed_config_file: /dev/zero}\n",
                    "device.yaml")
    assert "'/dev/zero' is not a regular file" in _refusal(device)


# --- The recipe a launch names ---

def test_the_recipe_named_by_meshplan_recipe_is_read_with_the_same_limits(tmp_path: Path) -> None:
    environ = {"LOCAL_RANK": "0", "ACCELERATE_USE_DEEPSPEED": "true"}
    bomb = _write(tmp_path, '# meshplan: {"tp_plan": ' + "[" * 1000 + "]" * 1000 + "}\n" + ALIAS_BOMB)
    with pytest.raises(PlanError, match=f"{RECIPE_VARIABLE}=.*nests deeper than {MAX_DEPTH} levels"):
        launched_recipe_extras(environ={**environ, RECIPE_VARIABLE: str(bomb)})
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with _no_hang(), pytest.raises(PlanError, match="is not a regular file"):
        launched_recipe_extras(environ={**environ, RECIPE_VARIABLE: str(fifo)})


# --- The shipped recipes stay well inside every limit ---

def test_every_catalogue_recipe_still_reads_and_accelerate_still_accepts_it() -> None:
    paths = sorted(CATALOGUE_DIR.glob("*.yaml"))
    assert paths
    for path in paths:
        recipe = read_recipe(path)
        assert recipe.num_processes and recipe.num_processes >= 1, path.name
        config = load_config_from_file(str(path))  # what `accelerate launch --config_file` does first
        assert config.num_processes == recipe.num_processes, path.name


# --- Through the command line: exit 2 and one line, before any worker starts ---

@pytest.mark.parametrize("case", ["alias bomb", "NaN in the header"])
def test_the_cli_refuses_a_crafted_recipe_with_exit_2_and_one_line(case: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from meshplan.cli import main

    nan_header = '# meshplan: {"gradient_clipping": NaN}\n'
    text = {"alias bomb": ALIAS_BOMB, "NaN in the header": nan_header + (CATALOGUE_DIR / "zero2.yaml").read_text()}
    recipe = _write(tmp_path, text[case])
    assert main(["finetune", "--recipe", str(recipe), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and len(error) < 500, error
    assert "Traceback" not in error and "recipe.yaml" in error
    assert ("more than" if case == "alias bomb" else "holds NaN") in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_json_header_written_by_meshplan_still_round_trips(tmp_path: Path) -> None:
    strategy = ZeRO(stage=3, offload_optimizer=True, pin_memory=True, stage3_max_live_parameters=10 ** 9,
                    gradient_clipping=0.5)
    path = strategy.to_recipe(tmp_path / "r.yaml", num_processes=4)
    assert json.loads(path.read_text().split("# meshplan: ", 1)[1].splitlines()[0])
    assert meshplan.from_recipe(path) == strategy
