"""Issue 11, items 8 and 11: inputs are checked where they meet the model. Token ids against the vocabulary (in the
forward, and once for a whole token stream in `oryx train` / `oryx eval`), id and embedding dtypes and shapes, and
`OryxConfig` keys and values; what is valid still gives the reference results."""

import json

import numpy as np
import pytest
import torch
import torch._dynamo
from helpers import cli_args, error_line, make_corpus, tiny
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from oryx import OryxConfig, OryxForCausalLM
from oryx.data import load_tokens
from oryx.training import train

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 300


@pytest.fixture(scope="module")
def model() -> OryxForCausalLM:
    torch.manual_seed(0)
    config = OryxConfig(variant="tg", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_dim=32)
    return OryxForCausalLM(config).eval()


# --- item 8: token ids against the vocabulary --------------------------------------------------------------------
def test_ids_outside_the_vocabulary_are_refused_naming_the_range(model, gen):
    ids = torch.randint(0, VOCAB, (3, 17), generator=gen)
    reference = model(ids).logits
    row, col = torch.randint(0, 3, (), generator=gen).item(), torch.randint(0, 17, (), generator=gen).item()
    for bad in (VOCAB, VOCAB + int(torch.randint(1, 10**6, (), generator=gen)), -1):
        poisoned = ids.clone()
        poisoned[row, col] = bad
        with pytest.raises(ValueError, match=rf"token id {bad}, outside the model's vocabulary \[0, {VOCAB}\)"):
            model(poisoned)
    assert torch.equal(model(ids).logits, reference)  # valid ids: unchanged results


def test_the_id_check_adds_no_host_sync_under_compile(model, gen):
    """Compiling the embedding step traces it without a graph break: the range check (a host read) is skipped."""
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    explanation = torch._dynamo.explain(model.model._embed)(ids, None)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_token_streams_are_checked_once_against_the_vocabulary(tmp_path, gen):
    from oryx.data import check_token_ids

    ids = torch.randint(0, VOCAB, (5000,), generator=gen).numpy().astype(np.uint16)
    check_token_ids(ids, VOCAB, "stream")  # every id valid: passes
    ids[int(torch.randint(0, 5000, (), generator=gen))] = VOCAB + 7
    with pytest.raises(ValueError, match=rf"stream holds token id {VOCAB + 7}, outside .*\[0, {VOCAB}\)"):
        check_token_ids(ids, VOCAB, "stream")
    # Across the shards of a folder (memory-mapped), as training reads them.
    (tmp_path / "shards").mkdir()
    ids[:2500].tofile(tmp_path / "shards" / "a.bin")
    ids[2500:].tofile(tmp_path / "shards" / "b.bin")
    with pytest.raises(ValueError, match=str(VOCAB + 7)):
        check_token_ids(load_tokens(tmp_path / "shards"), VOCAB, "shards")


def test_train_on_random_ids_and_eval_with_a_larger_tokenizer_are_refused(tmp_path, capsys, gen):
    corpus = make_corpus(tmp_path)
    shard = tmp_path / "random.bin"
    torch.randint(0, 60000, (20000,), generator=gen).numpy().astype(np.uint16).tofile(shard)
    config = tiny(corpus, tmp_path / "run", steps=2, save_every=2, eval_every=2)  # byte tokenizer: 320 ids
    error_line(capsys, ["train", *cli_args(config), "--train-data", str(shard)], "train_data", str(shard), "[0, 320)")
    assert not (tmp_path / "run").exists()
    train(config)
    line = error_line(capsys, ["eval", "ppl", config.out_dir, "--tokenizer", "gpt2"], "--tokenizer gpt2", "[0, 320)",
                      command="eval ppl")  # fmt: skip
    assert "IndexError" not in line


# --- item 11: ids, embeddings and configs at the model's edge ---------------------------------------------------
def test_id_dtypes_other_than_int64_and_int32_are_refused(model, gen):
    ids = torch.randint(0, VOCAB, (2, 11), generator=gen)
    assert torch.equal(model(ids.int()).logits, model(ids).logits)
    for dtype in (torch.int16, torch.uint8, torch.float32, torch.bool):
        with pytest.raises(TypeError, match=f"int64 or int32 token ids, got {dtype}"):
            model(ids.to(dtype))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_empty_batches_are_a_clear_error(model, shape):
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape"):
        model(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs_embeds is empty"):
        model(inputs_embeds=torch.zeros(*shape, 64))


def test_inputs_embeds_of_the_wrong_width_rank_or_dtype(model, gen):
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    embeds = model.get_input_embeddings()(ids).detach()
    assert torch.allclose(model(inputs_embeds=embeds).logits, model(ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[batch, length, hidden_size=64\], got shape \[2, 7, 32\]"):
        model(inputs_embeds=embeds[..., :32])
    with pytest.raises(ValueError, match=r"got shape \[7, 64\]"):
        model(inputs_embeds=embeds[0])
    with pytest.raises(TypeError, match="floating point"):
        model(inputs_embeds=embeds.long())
    with pytest.raises(TypeError, match=r"torch.float64 but the model's weights are torch.float32"):
        model(inputs_embeds=embeds.double())


def test_config_refuses_unknown_keys_with_a_hint():
    with pytest.raises(TypeError, match="unknown key 'hiden_size' \\(did you mean 'hidden_size'\\?\\)"):
        OryxConfig.from_preset("oryx-tg-tiny", hiden_size=5)
    with pytest.raises(TypeError, match="unknown key 'num_layers'"):
        OryxConfig(num_layers=4)


@pytest.mark.parametrize(
    ("key", "value"),
    [("vocab_size", 0), ("num_hidden_layers", 0), ("num_hidden_layers", -2), ("hidden_size", 0), ("chunk_size", 0),
     ("head_dim", 0), ("vocab_size", 2.5), ("vocab_size", True), ("rms_norm_eps", -1e-6),
     ("rms_norm_eps", float("nan")), ("rope_theta", 0.0)],
)  # fmt: skip
def test_config_refuses_impossible_values(key, value):
    with pytest.raises(ValueError, match=key):
        OryxConfig.from_preset("oryx-tg-tiny", **{key: value})


def test_saved_configs_with_transformers_keys_still_load(tmp_path, gen):
    """Keys transformers itself writes, reads or passes (its config's own fields, dtype, labels, generation
    settings) are not "unknown": a config carrying them saves and loads, through the Auto classes too."""
    reference = PreTrainedConfig().to_dict()  # what transformers saves for any config
    given = dict(
        torch_dtype="float32", use_cache=False, _name_or_path="mine", id2label={0: "no", 1: "yes"},
        architectures=["OryxForCausalLM"], transformers_version="5.0.0",
    )  # fmt: skip
    extra = {k: v for k, v in reference.items() if k not in ("model_type", *given)}
    config = OryxConfig.from_preset("oryx-tg-tiny", vocab_size=VOCAB, **given, **extra)
    model = OryxForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    rebuilt = OryxConfig(**{k: v for k, v in saved.items() if k != "model_type"})  # every saved key accepted
    resaved = json.loads(rebuilt.to_json_string())
    assert {k: resaved.get(k) for k in saved} == saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert AutoConfig.from_pretrained(tmp_path).hidden_size == config.hidden_size
    ids = torch.randint(0, VOCAB, (1, 9), generator=gen)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="num_heads"):  # derived: a saved value must agree
        OryxConfig(**{**saved, "num_heads": saved["num_heads"] + 1})
