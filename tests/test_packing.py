"""Sequence packing (``train.packing``): the layout of packed rows, a packed row's logits equal to
each example's alone, one step's loss and gradients equal with and without packing (online and
cached teacher), and the refusal of the terms that read whole rows."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qwen_distillation.data.encode import IGNORE_INDEX
from qwen_distillation.data.manager import (collate, collate_packed, first_fit_decreasing, length_grouped_batches,
                                            pack_rows)
from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.parts import model_inputs, position_mask, response_targets
from qwen_distillation.training.module import per_step_mean
from tests.conftest import compose_config, loss_plan, tiny_overrides
from tests.test_teacher_cache import small_tokenizer  # noqa: F401 - a fixture of the cached-run test

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 97
PAD = 0


def _model(family: str, attn: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[
        family]
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          attn_implementation=attn)
    return model_class(config).eval()


def _examples(lengths, seed: int = 1, prompt: int = 3) -> list[dict]:
    """Examples of the given lengths: random tokens, the first ``prompt`` of them unlabelled."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, VOCAB, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * min(prompt, n) + ids[prompt:],
                    "domain": i % 2, "example_id": 100 + i})
    return out


def _segments(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, length) of each example of a packed batch, in row-major order (the padding
    excluded: its input ids are PAD, which the examples never hold)."""
    out = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            if batch["input_ids"][row, start] != PAD:
                out.append((row, start, end - start))
    return out


def test_rows_are_first_fit_decreasing_deterministic_and_never_split_an_example():
    lengths = [5, 9, 3, 9, 2, 7, 10]
    rows = pack_rows(lengths, 12)
    # Longest first (10, then the 9s in order, ...), each into the first row with room.
    assert rows == [[6, 4], [1, 2], [3], [5, 0]]
    assert rows == pack_rows(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert pack_rows([12, 12], 12) == [[0], [1]]
    assert pack_rows([4, 4, 4], 12) == [[0, 1, 2]]
    # First fit at 256 would give rows of 210 and 80 (420 positions, more than 4 x 100 unpacked);
    # rows of at most 100 give 300.
    assert first_fit_decreasing([100, 90, 80, 20], 256) == [[0, 1, 3], [2]]
    assert pack_rows([100, 90, 80, 20], 256) == [[0], [1], [2, 3]]


def test_packing_never_pads_more_than_one_example_per_row():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        count = int(torch.randint(1, 17, (1,), generator=generator))
        lengths = torch.randint(1, 300, (count,), generator=generator).tolist()
        rows = pack_rows(lengths, 300)
        assert sorted(i for row in rows for i in row) == list(range(count))
        assert all(sum(lengths[i] for i in row) <= 300 for row in rows)
        assert len(rows) * max(sum(lengths[i] for i in row) for row in rows) <= count * max(lengths)


def test_a_packed_batch_holds_each_example_whole_with_its_own_positions_and_labels():
    examples = _examples([7, 12, 3, 9, 5, 1])
    batch = collate_packed(examples, PAD, 20)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 19)  # 37 tokens in 38 positions
    segments = _segments(batch)
    by_id = {e["example_id"]: e for e in examples}
    assert len(segments) == len(examples)
    for (row, start, n), example_id in zip(segments, batch["example_id"].tolist()):
        example = by_id[example_id]
        assert batch["input_ids"][row, start:start + n].tolist() == example["input_ids"]
        assert batch["position_ids"][row, start:start + n].tolist() == list(range(n))
        # The first label is dropped: the previous example's last position never predicts it.
        assert batch["labels"][row, start:start + n].tolist() == [IGNORE_INDEX] + example["labels"][1:]
    assert batch["domain"].tolist() == [by_id[i]["domain"] for i in batch["example_id"].tolist()]
    # The same targets as the unpacked batch, example by example in the packed order.
    unpacked = collate(examples, PAD)
    per_example = {e["example_id"]: response_targets(unpacked["labels"][i:i + 1]).tolist()
                   for i, e in enumerate(examples)}
    assert response_targets(batch["labels"]).tolist() == [t for i in batch["example_id"].tolist()
                                                          for t in per_example[i]]
    # A target never crosses a boundary: an example's last position predicts nothing.
    mask = position_mask(batch["labels"])
    for row, start, n in segments:
        assert not mask[row, start + n - 1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_packed_row_gives_each_example_its_logits_alone(family, attn):
    model = _model(family, attn)
    examples = _examples([7, 12, 3, 9, 5, 1])
    batch = collate_packed(examples, PAD, 20)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        # Without the restarting positions the row is one sequence: the later examples differ.
        one_sequence = model(input_ids=batch["input_ids"], use_cache=False).logits
    crossed = 0.0
    for row, start, n in _segments(batch):
        example = next(e for e in examples if e["input_ids"] == batch["input_ids"][row, start:start + n].tolist())
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
        torch.testing.assert_close(packed[row, start:start + n], alone, atol=1e-5, rtol=0)
        crossed = max(crossed, float((one_sequence[row, start:start + n] - alone).abs().max()))
    assert crossed > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn,layout", [("sdpa", "rows"), ("flash_attention_2", "rows"), ("varlen", "rows"),
                                         ("flash_attention_2", "padding_free"), ("varlen", "padding_free")])
def test_on_the_gpu_a_packed_row_gives_each_example_its_logits_alone(attn, layout):
    """bf16 on CUDA; flash attention runs its varlen kernel from the batch's cu_seq_lens, ``varlen``
    PyTorch's. The error against each example alone must be far below what attending across
    examples gives."""
    import importlib.util

    from qwen_distillation.data.manager import HOST_KEYS
    from qwen_distillation.modeling import varlen

    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attention_2 needs the flash-attn package")
    if attn == "varlen":
        if not varlen.varlen_available():
            pytest.skip("this torch has no torch.nn.attention.varlen")
        varlen.register()
    model = _model("qwen2", attn).to("cuda", torch.bfloat16)
    examples = _examples([7, 12, 3, 9, 5, 1])
    batch = {k: v if k in HOST_KEYS else v.cuda() for k, v in collate_packed(examples, PAD, 20, layout).items()}
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits.float()
        one_sequence = model(input_ids=batch["input_ids"], use_cache=False).logits.float()
    error = crossed = 0.0
    for row, start, n in _segments(batch):
        ids = batch["input_ids"][row, start:start + n]
        with torch.no_grad():
            alone = model(input_ids=ids[None], use_cache=False).logits[0].float()
        error = max(error, float((packed[row, start:start + n] - alone).abs().max()))
        crossed = max(crossed, float((one_sequence[row, start:start + n] - alone).abs().max()))
    assert error < 0.1 * crossed, (error, crossed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (14, 2)])
@pytest.mark.parametrize("lengths", [[1], [7, 12, 3, 9, 5, 1], [300, 17, 129]])
def test_on_the_gpu_the_varlen_kernel_matches_its_reference(heads, kv_heads, lengths):
    """PyTorch's flash varlen kernel against the per-sequence SDPA reference, bf16, forward and the
    gradients of q, k and v."""
    from qwen_distillation.modeling.varlen import varlen_available, varlen_kernel, varlen_reference

    if not varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    total, dim = sum(lengths), 64
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    inputs = [torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for h in (heads, kv_heads, kv_heads)]
    results = []
    for fn in (varlen_kernel, varlen_reference):
        for x in inputs:
            x.grad = None
        out = fn(*inputs, cu, max(lengths), dim ** -0.5)
        out.float().pow(2).sum().backward()
        results.append((out.float(), [x.grad.float() for x in inputs]))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("layout", ["rows", "padding_free"])
def test_the_packed_batch_names_where_each_sequence_of_its_flattened_rows_starts(layout):
    """``cu_seq_lens`` (for the varlen attention) start every example and each row's padding, in
    the flattened rows' order, and agree with the restarting position ids; the attention's max
    length is the longest of those sequences, read from the host copy ``sequence_starts``."""
    batch = collate_packed(_examples([7, 12, 3, 9, 5, 1]), PAD, 20, layout)
    rows, length = batch["input_ids"].shape
    cu = batch["cu_seq_lens"]
    assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == rows * length
    assert batch["sequence_starts"].tolist() == cu.tolist() and batch["sequence_starts"].dtype == torch.long
    flat_positions = batch["position_ids"].reshape(-1)  # every sequence starts where its positions restart
    assert cu[:-1].tolist() == torch.nonzero(flat_positions == 0).flatten().tolist()
    flat_segments = batch["segments"].reshape(-1)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):  # each sequence is one example or one padding
        assert len(set(flat_segments[start:end].tolist())) == 1
    assert model_inputs(batch)["cu_seq_lens_q"] is batch["cu_seq_lens"]
    assert model_inputs(batch)["max_length_q"] == model_inputs(batch)["max_length_k"] == max(cu.diff().tolist())
    if layout == "padding_free":  # one row, the examples back to back in the micro-batch's order
        assert (rows, length) == (1, 37) and bool((batch["segments"] >= 0).all())
        assert model_inputs(batch)["max_length_q"] == 12
    else:
        assert rows > 1
    del batch["sequence_starts"]  # without the host copy: the row length, an upper bound
    assert model_inputs(batch)["max_length_q"] == length


def test_a_padding_free_micro_batch_cut_by_tokens_holds_at_most_its_token_budget():
    """``by_tokens`` with the one-row layout: each micro-batch is one row of at most
    ``pack_length * batch_size`` tokens (no row-count bound: its positions are its tokens), and
    the examples are those of the whole step, each once."""
    examples = _examples([30, 2, 25, 17, 9, 31, 4, 12, 28, 6], seed=5)
    batches = length_grouped_batches(examples, 2, PAD, pack_length=32, by_tokens=True, layout="padding_free")
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= 64 for b in batches)
    assert sum(b["input_ids"].numel() for b in batches) == sum(len(e["input_ids"]) for e in examples)
    assert sorted(i for b in batches for i in b["example_id"].tolist()) == [e["example_id"] for e in examples]
    # sorted by length and cut greedily at 64 tokens: 2..17 (50), 25 + 28 (53), 30 + 31 (61)
    assert [b["input_ids"].shape[1] for b in batches] == [50, 53, 61]


def test_varlen_attention_off_a_gpu_is_refused_by_name_and_unpacked_batches_run_sdpa():
    from qwen_distillation.modeling import varlen

    varlen.register()
    model = _model("qwen2", "varlen")
    examples = _examples([7, 12, 3])
    padded = collate(examples, PAD)
    reference = _model("qwen2", "sdpa")
    with torch.no_grad():  # no cu_seq_lens: the SDPA path with transformers' sdpa mask, same logits
        torch.testing.assert_close(model(**model_inputs(padded)).logits, reference(**model_inputs(padded)).logits)
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="attn_implementation=varlen.*CUDA"):
                model(**model_inputs(collate_packed(examples, PAD, 20)))


def test_a_run_on_a_cpu_refuses_varlen_attention_before_training():
    from qwen_distillation.modeling import varlen
    from qwen_distillation.modeling.speed import apply_speedups

    varlen.register()
    with pytest.raises(ConfigError, match="varlen.*CUDA GPU; running on cpu.*attn_implementation"):
        apply_speedups([_model("qwen2", "sdpa"), _model("qwen2", "varlen")], device=torch.device("cpu"))
    assert apply_speedups([_model("qwen2", "sdpa")], device=torch.device("cpu")) == []


def _step(module, teacher, batches):
    """One step's per-token loss and the trained parameters' gradients, as the distiller computes them."""
    from qwen_distillation.training.teacher import TeacherRunner

    module.zero_grad()
    tokens = sum(int(response_targets(b["labels"]).numel()) for b in batches)
    total, terms_total = 0.0, {}
    for batch in batches:
        terms, _ = module(batch, TeacherRunner(teacher)(batch, module.plan))
        means = per_step_mean(terms, tokens, len(batches))
        loss = sum(module.plan.weights.get(name, 1.0) * value for name, value in means.items())
        loss.backward()
        total += float(loss.detach())
        for name, value in means.items():
            terms_total[name] = terms_total.get(name, 0.0) + float(value.detach())
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return total, tokens, terms_total, grads


STEP_PLANS = {
    "ce_kd_hidden_path": dict(weights={"ce": 0.4, "kd": 0.6}, chunk_size=16),
    "ce_kd_full_logits": dict(weights={"ce": 0.4, "kd": 0.6}, chunk_size=0),
    # Every row-wide term, taken per example on packed rows; terms kept apart to compare each.
    "all_terms": dict(weights={"ce": 0.5, "kd": 0.5, "feature": 0.3, "attention": 0.2, "contrastive": 0.1},
                      chunk_size=16, separate_logit_terms=True, feature_pairs=((0, 1), (1, 2)),
                      attention_pairs=((1, 2),), relation_heads=4, attention_chunk=8, domain_aware=True),
}


@pytest.mark.parametrize("packed_attn,layout", [("sdpa", "rows"), ("varlen", "rows"), ("varlen", "padding_free")])
@pytest.mark.parametrize("case", list(STEP_PLANS))
def test_one_step_loss_and_gradients_equal_with_and_without_packing(case, packed_attn, layout, monkeypatch):
    """``packed_attn``: the packed step's attention; ``varlen`` runs its pure-torch reference here
    (the flash kernel needs a GPU, where it is checked against the reference). ``layout``: rows of
    at most 32 tokens, or each micro-batch in one row with no padding."""
    from qwen_distillation.losses.contrastive import ContrastiveHead
    from qwen_distillation.losses.feature import FeatureProjector
    from qwen_distillation.modeling import varlen
    from qwen_distillation.training.module import DistillationModule, Heads

    student, teacher = _model("qwen2", "sdpa", layers=2, seed=0), _model("qwen2", "sdpa", layers=3, seed=1)
    student.train()
    if packed_attn == "varlen":
        varlen.register()
        monkeypatch.setattr(varlen, "kernel", varlen.varlen_reference)
    options = dict(STEP_PLANS[case])
    plan = loss_plan(options.pop("weights"), VOCAB, temperature=2.0, **options)
    torch.manual_seed(2)
    heads = Heads(feature=FeatureProjector(list(plan.feature_pairs), 32, 32) if plan.feature_pairs else None,
                  contrastive=ContrastiveHead(32, 32, 16) if plan.active("contrastive") else None)
    module = DistillationModule(student, heads)
    module.plan = plan
    examples = _examples([7, 30, 3, 18, 5, 11, 24, 2], seed=3)
    plain = length_grouped_batches(examples, 4, PAD)
    packed = length_grouped_batches(examples, 4, PAD, pack_length=32, layout=layout)
    # 8 rows of examples in 4 packed rows, or in one row per micro-batch
    assert [b["input_ids"].shape[0] for b in packed] == ([1, 3] if layout == "rows" else [1, 1])
    assert sum(b["input_ids"].numel() for b in packed) < sum(b["input_ids"].numel() for b in plain)
    loss_plain, tokens_plain, terms_plain, grads_plain = _step(module, teacher, plain)
    for model in (student, teacher):
        model.config._attn_implementation = packed_attn
    loss_packed, tokens_packed, terms_packed, grads_packed = _step(module, teacher, packed)
    assert tokens_packed == tokens_plain
    assert terms_packed.keys() == terms_plain.keys() == (set(plan.weights) if plan.separate_logit_terms else {"logit"})
    for name in terms_plain:
        assert terms_packed[name] == pytest.approx(terms_plain[name], rel=1e-5, abs=1e-7), name
        assert abs(terms_plain[name]) > 1e-4, name
    assert loss_packed == pytest.approx(loss_plain, rel=1e-5)
    assert grads_packed.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_packed[name], grads_plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_a_cached_teacher_gives_a_packed_batch_the_rows_of_its_examples():
    """The cache is looked up by example_id in the packed order, which is the order of the packed
    batch's response positions: the sparse KD equals the unpacked batch's."""
    from qwen_distillation.training.module import DistillationModule, Heads
    from qwen_distillation.training.teacher_cache import CachedTeacher, responses, teacher_entries

    student, teacher = _model("qwen2", "sdpa", seed=0), _model("qwen2", "sdpa", seed=1)
    examples = _examples([7, 12, 3, 9, 5], seed=7)
    entries = {}
    for example in examples:  # each example cached alone, as the cache command writes it
        (entry,) = teacher_entries(teacher, collate([example], PAD), vocab_size=VOCAB, k=8)
        entries[example["example_id"]] = entry

    class Reader:
        def lookup(self, key, checksum, rows):
            assert rows == entries[key][0].shape[0]
            return entries[key]

    cached = CachedTeacher.__new__(CachedTeacher)
    cached.reader, cached.tail = Reader(), "bucket"
    cached.keys = {e["example_id"]: (e["example_id"], 0, responses(e)) for e in examples}
    plan = loss_plan({"ce": 0.5, "kd": 0.5}, VOCAB)
    module = DistillationModule(student, Heads())
    module.plan = plan
    values = []
    for batch in (collate(examples, PAD), collate_packed(examples, PAD, 24),
                  collate_packed(examples, PAD, 24, "padding_free")):
        terms, info = module(batch, cached(batch, plan))
        values.append((float(terms["logit"].detach()), float(info["kd"])))
    for packed in values[1:]:  # rows of 24 tokens, and one row
        assert packed[0] == pytest.approx(values[0][0], rel=1e-5)
        assert packed[1] == pytest.approx(values[0][1], rel=1e-5) and values[0][1] > 0


def test_packing_refuses_an_attention_that_would_mix_examples_naming_both_options(tmp_path):
    from qwen_distillation.config.validate import validate_config

    base = tiny_overrides(tmp_path) + ["train.packing=true"]
    validate_config(compose_config(base))  # every stage's terms (stage 2: all five) pack
    validate_config(compose_config(base + ["model.student.attn_implementation=eager"]))
    with pytest.raises(ConfigError, match=r"model\.teacher\.attn_implementation=paged\|sdpa: .*train\.packing=false"):
        validate_config(compose_config(base + ["model.teacher.attn_implementation=paged|sdpa"]))
    validate_config(compose_config(tiny_overrides(tmp_path) + ["model.teacher.attn_implementation=paged|sdpa"]))


def test_loaded_models_whose_attention_would_mix_examples_are_refused():
    from qwen_distillation.modeling.parts import check_packed_attention

    check_packed_attention({"teacher": _model("llama", "eager"), "student": _model("qwen2", "sdpa"), "none": None})
    model = _model("qwen2", "sdpa")
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ConfigError, match=r"the student runs attention 'paged\|sdpa'.*model\.student\.attn_impl"
                                          r"ementation.*train\.packing=false"):
        check_packed_attention({"student": model})


def test_a_probe_on_the_model_refuses_families_whose_packed_rows_leak():
    """Packing keeps examples apart only where the model takes its positions and mask from the position
    ids. OPT takes its learned positions' offsets from the attention mask and builds its mask without
    them; GPT-NeoX and OLMo-2 (and the Llama family) keep them apart. The probe runs each model itself."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Olmo2Config, Olmo2ForCausalLM, OPTConfig, OPTForCausalLM

    from qwen_distillation.modeling.parts import LEAK_TOLERANCE, check_packed_attention, packed_row_leak

    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128)
    torch.manual_seed(0)
    kept = {"student": _model("qwen2", "sdpa"), "teacher": GPTNeoXForCausalLM(GPTNeoXConfig(**shape))}
    kept["student"].train()
    under_autocast = []  # the probe runs in the run's precision (flash and varlen attention need half)
    kept["student"].register_forward_pre_hook(lambda *_: under_autocast.append(torch.is_autocast_enabled("cpu")))
    check_packed_attention(kept, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert len(under_autocast) > 3 and all(under_autocast)  # every forward of the probe
    check_packed_attention({"teacher": Olmo2ForCausalLM(Olmo2Config(**shape))})
    assert kept["student"].training  # the probe runs in eval mode and gives the mode back
    leak = packed_row_leak(kept["student"])
    assert leak.packed < 1e-5 < 1e-2 < leak.mixed  # fp32 rounding, against what one sequence moves
    assert leak.swapped == leak.control == 0  # kept apart: another first example moves the second not a bit
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32))
    leak = packed_row_leak(opt)
    assert leak.packed > LEAK_TOLERANCE * leak.mixed > 0 and leak.leaks()
    with pytest.raises(ConfigError, match=r"train\.packing=true: the teacher \(OPTForCausalLM\) lets a packed row's "
                                          r"examples see each other.*set train\.packing=false"):
        check_packed_attention({"student": kept["student"], "teacher": opt})


def test_a_model_the_packing_probe_cannot_run_is_let_through_with_a_warning(caplog):
    """A backend the probe cannot drive (here: any forward raising) leaves the check to training itself."""
    from qwen_distillation.modeling.parts import check_packed_attention

    model = _model("qwen2", "sdpa")
    model.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("no such kernel")))
    with caplog.at_level("WARNING"):
        check_packed_attention({"student": model})
    assert "could not probe whether the student keeps a packed row's examples apart (RuntimeError: no such kernel)" \
        in caplog.text


def test_a_model_that_runs_an_example_alone_but_not_a_packed_row_is_refused_by_name():
    """Training would raise at its first packed step; the probe refuses at set-up, naming the option
    and keeping the model's own message."""
    from qwen_distillation.modeling.parts import check_packed_attention

    model = _model("qwen2", "sdpa")

    def no_packed_rows(module, args, kwargs):
        if "position_ids" in kwargs:
            raise ValueError("this kernel cannot keep packed sequences apart")

    model.register_forward_pre_hook(no_packed_rows, with_kwargs=True)
    with pytest.raises(ConfigError, match=r"train\.packing=true: the student \(Qwen2ForCausalLM\) runs an example "
                                          r"alone but not in a packed row \(ValueError: this kernel cannot keep packed "
                                          r"sequences apart\); set train\.packing=false"):
        check_packed_attention({"student": model})


def test_a_linear_attention_hybrid_is_refused_or_kept_apart_never_mixed():
    """Qwen3.5 interleaves gated linear-attention layers with attention layers. Without the kernels
    that read a packed row's bounds, transformers refuses the packed row, and so does the set-up;
    where it runs the row, the probe must find the examples apart."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3_5TextConfig"):
        pytest.skip("this transformers has no Qwen3.5")
    from qwen_distillation.modeling.parts import PackedForwardError, check_packed_attention, packed_row_leak

    torch.manual_seed(0)
    config = transformers.Qwen3_5TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, max_position_embeddings=128)
    model = transformers.Qwen3_5ForCausalLM(config)
    assert "linear_attention" in config.layer_types
    try:
        leak = packed_row_leak(model)
    except PackedForwardError:
        with pytest.raises(ConfigError, match=r"runs an example alone but not in a packed row.*train\.packing=false"):
            check_packed_attention({"teacher": model})
    else:
        assert not leak.leaks()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_leak_under_the_rounding_between_shapes_is_found_by_swapping_the_example_before(dtype):
    """A random Falcon-H1 carries its Mamba state across a packed row's examples, but the packed example
    differs from itself alone by only 1-2 % of what mixing moves: under LEAK_TOLERANCE, which must allow
    bf16 rounding between shapes. Swapping the example before it moves it under every swap, while the same
    swaps in separate rows move it not at all; the set-up refuses it by name. A mixture of experts, whose
    grouping changes with the swap, is kept."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FalconH1Config"):
        pytest.skip("this transformers has no Falcon-H1")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qwen_distillation.modeling.parts import LEAK_TOLERANCE, check_packed_attention, packed_row_leak

    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    falcon = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**shape)).to(dtype)
    leak = packed_row_leak(falcon)
    assert leak.packed < LEAK_TOLERANCE * leak.mixed  # what the first measure alone let through
    assert leak.swapped > 5e-3 * leak.mixed and leak.control == 0 and leak.leaks()
    with pytest.raises(ConfigError, match=r"train\.packing=true: the student \(FalconH1ForCausalLM\) lets a packed "
                                          r"row's examples see each other: an example's logits in a packed row move "
                                          r"by at least .* whenever the example before it is swapped.*set "
                                          r"train\.packing=false"):
        check_packed_attention({"student": falcon})
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, moe_intermediate_size=32, num_experts=4,
                                             num_experts_per_tok=2)).to(dtype)
    check_packed_attention({"student": moe})


@pytest.mark.slow
def test_a_run_with_packing_logs_the_losses_of_the_run_without_and_less_padding(tmp_path):
    """Stage 2 (all five terms, GradNorm) and stage 3 (hard-example sampling), tiny pair: every
    step's losses, tokens and gradient norm equal the unpacked run's; only the padding differs."""
    from qwen_distillation.app import run
    from tests.conftest import train_rows

    rows = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        run(compose_config(tiny_overrides(out, steps=2) + [
            f"train.packing={packing}", "data.max_length=256", "start_stage=2", "stage2.batch_size=4",
            "stage3.batch_size=4", "stage3.sampling.rescore_every=1"]))
        rows[packing] = train_rows(out)
    assert [r["stage"] for r in rows["true"]] == [2, 2, 3, 3]
    for plain, packed in zip(rows["false"], rows["true"]):
        assert packed["tokens"] == plain["tokens"]
        for key in ("loss", "loss/ce", "loss/kd", "loss/feature", "loss/attention", "loss/contrastive", "grad_norm"):
            if key in plain:
                assert packed[key] == pytest.approx(plain[key], rel=1e-5), key
        assert packed["padding"] < plain["padding"]
        # ``positions`` (all positions of the step's micro-batches) gives the same real input tokens
        assert packed["positions"] < plain["positions"]
        assert packed["positions"] * (1 - packed["padding"]) == pytest.approx(
            plain["positions"] * (1 - plain["padding"]), rel=1e-9)


def test_a_packed_step_runs_fewer_micro_batches_with_the_same_losses(tmp_path, monkeypatch):
    """train.pack_step: stage 1 (CE + KD) and stage 3 (hard-example sampling) of the tiny pair, 4
    micro-batches of 2 demo examples a step at max_length 512. Packed together, a step's examples
    fill one or two micro-batches; every step's losses, tokens and gradient norm equal those of
    the run that packs each micro-batch apart."""
    from qwen_distillation.app import run
    from qwen_distillation.training.engine import SingleDeviceEngine
    from tests.conftest import train_rows

    forward = SingleDeviceEngine.forward
    calls: list[int] = []

    def counted(self, batch, teacher):
        calls[-1] += 1
        return forward(self, batch, teacher)

    monkeypatch.setattr(SingleDeviceEngine, "forward", counted)
    rows, passes = {}, {}
    for pack_step in ("false", "true"):
        out = tmp_path / pack_step
        calls.append(0)
        run(compose_config(tiny_overrides(out, steps=2) + [
            "train.packing=true", f"train.pack_step={pack_step}", "data.max_length=512", "stage2.enabled=false",
            "stage1.grad_accum=4", "stage3.grad_accum=4", "stage3.sampling.rescore_every=1"]))
        rows[pack_step], passes[pack_step] = train_rows(out), calls[-1]
    assert [r["stage"] for r in rows["true"]] == [1, 1, 3, 3]
    # 4 steps of 4 micro-batches each; packed together, 3 steps fit one micro-batch of 2 x 512 tokens
    # and one step's 8 demo examples need two
    assert passes == {"false": 16, "true": 5}
    for apart, together in zip(rows["false"], rows["true"]):
        assert together["tokens"] == apart["tokens"]
        for key in ("loss", "loss/ce", "loss/kd", "grad_norm"):
            if key in apart:
                assert together[key] == pytest.approx(apart[key], rel=1e-5), key


def test_pack_step_needs_packing_and_one_device(tmp_path):
    from qwen_distillation.config.validate import validate_config

    validate_config(compose_config(tiny_overrides(tmp_path) + ["train.packing=true", "train.pack_step=true"]))
    with pytest.raises(ConfigError, match=r"train\.pack_step.*train\.packing=true"):
        validate_config(compose_config(tiny_overrides(tmp_path) + ["train.pack_step=true"]))
    with pytest.raises(ConfigError, match=r"train\.pack_step=true does not work under .*distributed=none"):
        validate_config(compose_config(tiny_overrides(tmp_path) + ["train.packing=true", "train.pack_step=true",
                                                                   "distributed=zero2"]))


def test_a_packed_run_from_a_cache_logs_the_online_unpacked_losses(tmp_path, small_tokenizer):  # noqa: F811
    """Stage 1 reading the teacher from a top-k cache covering the whole vocabulary, with packing,
    logs the online, unpacked run's losses (the cache is looked up in the packed order)."""
    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher
    from tests.conftest import train_rows
    from tests.test_teacher_cache import VOCAB as CACHE_VOCAB, _config, _overrides

    extra = ("stage1.batch_size=4", "data.max_length=128")
    run(compose_config(_overrides(tmp_path / "online", small_tokenizer, *extra)))
    cache_teacher(_config(tmp_path / "x", small_tokenizer, *extra), tmp_path / "cache", k=CACHE_VOCAB)
    run(compose_config(_overrides(tmp_path / "packed", small_tokenizer, "stage1.teacher.source=cache",
                                  f"stage1.teacher.cache={tmp_path / 'cache'}", "train.packing=true", *extra)))
    online, packed = train_rows(tmp_path / "online"), train_rows(tmp_path / "packed")
    assert len(online) == len(packed) == 2
    for a, b in zip(online, packed):
        assert b["tokens"] == a["tokens"] and b["padding"] < a["padding"]
        for key in ("loss", "loss/kd", "loss/ce", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_the_attention_terms_key_windows_leave_the_loss_and_its_gradient_unchanged():
    """``sequence_starts`` lets each chunk of queries read only the keys from the start of its
    first query's example (the earliest over the rows): the same loss and gradients as reading all
    keys up to the chunk's end, fp64, for rows and for one row; and the windows do start late."""
    from qwen_distillation.losses.attention import _first_key, attention_distillation_loss

    examples = _examples([7, 30, 3, 18, 5, 11, 24, 2], seed=4)
    for layout in ("rows", "padding_free"):
        batch = collate_packed(examples, PAD, 40, layout)
        rows, length = batch["input_ids"].shape
        segments = batch["segments"]
        mask = position_mask(batch["labels"])
        generator = torch.Generator().manual_seed(0)
        student = [torch.randn(rows, heads, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
                   for heads in (4, 2, 2)]
        teacher = [torch.randn(rows, heads, length, 16, generator=generator, dtype=torch.float64)
                   for heads in (4, 2, 2)]
        values, grads = [], []
        for starts in (None, batch["sequence_starts"].tolist()):
            loss = attention_distillation_loss(student, teacher, mask, segments >= 0, relation_heads=4, chunk_size=8,
                                               segments=segments, sequence_starts=starts)
            values.append(loss.detach())
            grads.append(torch.autograd.grad(loss, student))
        assert float(values[0]) > 1e-3
        torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=0)
        for windowed, whole in zip(grads[1], grads[0]):
            torch.testing.assert_close(windowed, whole, rtol=1e-10, atol=1e-14)
        starts = batch["sequence_starts"].tolist()
        firsts = [_first_key(starts, rows, length, start) for start in range(0, length, 8)]
        assert all(first <= start for first, start in zip(firsts, range(0, length, 8)))
        if layout == "padding_free":  # one row of 100 tokens; queries 96.. lie in the example at 74..97
            assert length == 100 and firsts[-1] == 74


def test_padding_free_needs_packing_and_attention_that_reads_the_bounds(tmp_path):
    from qwen_distillation.config.validate import PACK_LAYOUTS, validate_config
    from qwen_distillation.data.manager import PACK_LAYOUTS as DATA_LAYOUTS
    from qwen_distillation.modeling.parts import check_packed_attention

    assert PACK_LAYOUTS == DATA_LAYOUTS
    varlen = ["model.teacher.attn_implementation=varlen", "model.student.attn_implementation=varlen"]
    base = tiny_overrides(tmp_path) + ["train.packing=true", "train.pack_layout=padding_free"]
    validate_config(compose_config(base + varlen))
    validate_config(compose_config(base + ["model.teacher.attn_implementation=flash_attention_2",
                                           "model.student.attn_implementation=varlen"]))
    with pytest.raises(ConfigError, match=r"model\.student\.attn_implementation=sdpa: .*one of varlen, "
                                          r"flash_attention_2, flash_attention_3.*train\.pack_layout=rows"):
        validate_config(compose_config(base + varlen[:1] + ["model.student.attn_implementation=sdpa"]))
    with pytest.raises(ConfigError, match=r"model\.teacher\.attn_implementation=None"):
        validate_config(compose_config(base))
    with pytest.raises(ConfigError, match=r"train\.pack_layout=padding_free: .*needs train\.packing=true"):
        validate_config(compose_config(tiny_overrides(tmp_path) + ["train.pack_layout=padding_free"] + varlen))
    with pytest.raises(ConfigError, match=r"train\.pack_layout=flat: must be one of rows, padding_free"):
        validate_config(compose_config(tiny_overrides(tmp_path) + ["train.packing=true", "train.pack_layout=flat"]))
    with pytest.raises(ConfigError, match=r"train\.pack_layout=padding_free: the teacher runs attention 'sdpa'.*"
                                          r"model\.teacher\.attn_implementation.*train\.pack_layout=rows"):
        check_packed_attention({"teacher": _model("qwen2", "sdpa")}, "padding_free")


def test_a_padding_free_run_logs_the_losses_of_the_run_in_rows_with_no_padding(tmp_path, monkeypatch):
    """Stage 2 of the tiny pair (all five terms, GradNorm), varlen attention (its pure-torch
    reference on the CPU): each step's losses, tokens and gradient norm in one row per micro-batch
    equal those in padded rows; the padding is 0."""
    from qwen_distillation.app import run
    from qwen_distillation.modeling import speed, varlen
    from tests.conftest import train_rows

    monkeypatch.setattr(varlen, "kernel", varlen.varlen_reference)
    monkeypatch.setattr(speed, "require_varlen", lambda device: None)
    rows = {}
    for layout in ("rows", "padding_free"):
        out = tmp_path / layout
        run(compose_config(tiny_overrides(out, steps=2) + [
            "train.packing=true", f"train.pack_layout={layout}", "model.teacher.attn_implementation=varlen",
            "model.student.attn_implementation=varlen", "data.max_length=256", "start_stage=2", "end_stage=2",
            "stage2.batch_size=4"]))
        rows[layout] = train_rows(out)
    assert [r["stage"] for r in rows["padding_free"]] == [2, 2]
    for packed, flat in zip(rows["rows"], rows["padding_free"]):
        assert flat["tokens"] == packed["tokens"] and flat["padding"] == 0 < packed["padding"]
        for key in ("loss", "loss/ce", "loss/kd", "loss/feature", "loss/attention", "loss/contrastive", "grad_norm"):
            assert flat[key] == pytest.approx(packed[key], rel=1e-5), key
