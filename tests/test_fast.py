"""The packed training path (engine/fast.py) computes what the plain transformers + peft path computes."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from engine import fast  # noqa: E402


def _tiny_lora_model(seed: int = 0, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)  # a trained-looking adapter, so the LoRA branch matters
    model.train()
    return model


def _examples(count: int, seed: int = 1) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        prompt = rng.randint(2, 9)
        answer = rng.randint(1, 12)
        ids = [rng.randrange(1, 97) for _ in range(prompt + answer)]
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def _reference_loss(model, examples) -> torch.Tensor:
    """Mean answer-token loss through the model's own forward, one sample at a time."""
    total = torch.zeros(())
    count = 0
    for ids, labels in examples:
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(1 for label in labels[1:] if label != -100)
        total = total + out.loss * n
        count += n
    return total / count


def test_plan_micro_batches_respects_budget_and_keeps_every_sample():
    lengths = [random.Random(3).randint(5, 300) for _ in range(40)]
    lengths[7] = 900  # longer than the budget: gets a pack of its own
    packs = fast.plan_micro_batches(list(range(40)), lengths, 512)
    assert sorted(i for pack in packs for i in pack) == list(range(40))
    for pack in packs:
        assert len(pack) == 1 or sum(lengths[i] for i in pack) <= 512
    assert [7] in packs


def test_length_grouped_steps_cover_all_samples_once_with_step_size():
    lengths = [random.Random(5).randint(1, 50) for _ in range(100)]
    steps = fast.length_grouped_steps(lengths, 16, seed=0)
    flat = [i for step in steps for i in step]
    assert sorted(flat) == list(range(100))
    assert all(len(step) == 16 for step in steps[:-1] if len(step) != 100 % 16)
    assert steps == fast.length_grouped_steps(lengths, 16, seed=0)


def test_shard_for_rank_partitions_a_step_evenly():
    lengths = [10, 200, 30, 400, 50, 60, 70, 80]
    shards = [fast.shard_for_rank(range(8), lengths, 3, rank) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(8))
    loads = [sum(lengths[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(lengths)


def test_pack_examples_targets_stay_inside_each_sample():
    examples = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10, 11], [-100, 10, 11])]
    batch = fast.pack_examples(examples)
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 4, 7]
    # Position 1 predicts 7, position 2 predicts 8; position 3 (end of sample 1) predicts nothing.
    assert batch.target_positions.tolist() == [1, 2, 4, 5]
    assert batch.targets.tolist() == [7, 8, 10, 11]
    assert batch.num_targets == 4


def test_packed_loss_matches_the_models_own_forward():
    model = _tiny_lora_model()
    examples = _examples(6)
    runner = fast.PackedCausalLM(model, fast.FastOptions(max_tokens=64))
    model.eval()
    with torch.no_grad():
        expected = _reference_loss(model, examples)
        batch = fast.pack_examples(examples)
        got = runner.loss_sum(batch) / batch.num_targets
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_packed_gradients_match_the_models_own_backward():
    examples = _examples(5)
    reference = _tiny_lora_model(seed=2)
    _reference_loss(reference, examples).backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}

    model = _tiny_lora_model(seed=2)
    runner = fast.PackedCausalLM(model, fast.FastOptions(max_tokens=40))
    packs = fast.plan_micro_batches(list(range(5)), [len(e[0]) for e in examples], 40)
    assert len(packs) > 1  # the step really is split and accumulated
    batches = [fast.pack_examples([examples[i] for i in pack]) for pack in packs]
    normalizer = sum(b.num_targets for b in batches)
    for batch in batches:
        (runner.loss_sum(batch) / normalizer).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_checkpointed_dropout_recomputes_the_same_masks():
    examples = _examples(4)
    grads = []
    for checkpointing in (False, True):
        model = _tiny_lora_model(seed=3, dropout=0.3)
        runner = fast.PackedCausalLM(model, fast.FastOptions(gradient_checkpointing=checkpointing))
        torch.manual_seed(11)
        batch = fast.pack_examples(examples)
        runner.loss_sum(batch).backward()
        grads.append(runner.flat.param.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_train_step_with_flat_parameters_equals_per_tensor_step():
    examples = _examples(6)
    results = []
    for flat in (False, True):
        model = _tiny_lora_model(seed=4)
        runner = fast.PackedCausalLM(model, fast.FastOptions(flat_parameters=flat))
        optimizer = torch.optim.AdamW(runner.optimizer_parameters(), lr=1e-2, weight_decay=0.0)
        batch = fast.pack_examples(examples)
        losses = [float(runner.train_step(optimizer, [batch], max_grad_norm=0.5).loss) for _ in range(3)]
        weights = torch.cat([p.detach().reshape(-1) for p in runner.trainable])
        results.append((losses, weights))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    assert results[1][0][-1] < results[1][0][0]


def test_options_from_recipe_take_the_token_budget_or_an_automatic_one():
    from engine.recipes import Recipe

    recipe = Recipe()
    recipe.train.gradient_checkpointing = True
    recipe.data.max_length = 512
    automatic = fast.options_from_recipe(recipe)
    assert automatic.max_tokens == fast.DEFAULT_MAX_TOKENS and automatic.gradient_checkpointing
    recipe.data.max_length = 8192  # a whole longest sample always fits one pack
    assert fast.options_from_recipe(recipe).max_tokens == 8192
    recipe.train.max_tokens_per_batch = 1536
    assert fast.options_from_recipe(recipe).max_tokens == 1536
    assert not fast.options_from_recipe(recipe).offload_checkpoints
    recipe.train.offload_activations = True
    assert fast.options_from_recipe(recipe).offload_checkpoints


def test_unsupported_reason_names_an_adapted_output_layer():
    assert fast.unsupported_reason(_tiny_lora_model()) is None
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "lm_head" in fast.unsupported_reason(model)


def test_trainable_token_rows_get_the_same_loss_and_gradients_as_peft():
    """New chat tokens train through peft's trainable-token rows in the embeddings and the untied lm_head."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(6)
        config = LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
        lora = LoraConfig(
            r=4,
            target_modules=["q_proj", "v_proj", "down_proj"],
            trainable_token_indices={"embed_tokens": [5, 9], "lm_head": [5, 9]},
        )
        model = get_peft_model(LlamaForCausalLM(config), lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "trainable_tokens_delta" in name:
                    param.normal_(std=0.2)
        return model.train()

    examples = [
        ([*ids[:3], 5, 9, *ids[3:]], [*labels[:3], 5, 9, *labels[3:]]) for ids, labels in _examples(4)
    ]
    reference = build()
    _reference_loss(reference, examples).backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in name for name in expected)

    model = build()
    runner = fast.PackedCausalLM(model, fast.FastOptions())
    batch = fast.pack_examples(examples)
    (runner.loss_sum(batch) / batch.num_targets).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_trainer_style_steps_survive_model_zero_grad():
    examples = _examples(5, seed=7)
    reference = _tiny_lora_model(seed=5)
    _reference_loss(reference, examples).backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}

    model = _tiny_lora_model(seed=5)
    runner = fast.PackedCausalLM(model, fast.FastOptions(max_tokens=32))
    features = [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    batch = fast.PackedCollator()(features)[fast.EXAMPLES_KEY]
    assert batch.num_targets == sum(1 for _, labels in examples for x in labels[1:] if x != -100)
    assert batch.num_tokens == sum(len(ids) for ids, _ in examples)
    for _ in range(2):  # the second round must not add onto the first round's gradients
        model.zero_grad()  # what transformers' Trainer does after each optimizer step
        runner.backward_examples(batch.examples, num_items=batch.num_targets)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, expected[name], rtol=1e-4, atol=1e-6), name
    assert torch.equal(runner.flat.param.grad, torch.cat([p.grad.reshape(-1) for p in runner.trainable]))


def test_parameters_given_new_storage_after_flattening_still_train():
    """Data-parallel wrapping re-assigns parameter storage once the optimizer holds the flat tensor."""
    examples = _examples(4)
    model = _tiny_lora_model(seed=8)
    runner = fast.PackedCausalLM(model, fast.FastOptions())
    optimizer = torch.optim.SGD(runner.optimizer_parameters(), lr=0.5)
    for param in runner.trainable:
        param.data = param.data.clone()  # what the wrapping does
    before = [p.detach().clone() for p in runner.trainable]
    model.zero_grad()
    runner.backward_examples(examples)
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(runner.trainable, before, strict=True))
    assert torch.equal(
        runner.flat.param.detach(), torch.cat([p.detach().reshape(-1) for p in runner.trainable])
    )


def test_a_pack_padded_for_graph_replay_keeps_its_targets_and_loss():
    examples = _examples(5)
    plain = fast.pack_examples(examples)
    padded = fast.pack_examples(examples, pad_to=plain.num_tokens + 7, num_sequences=9)
    assert padded.input_ids.shape[0] == plain.num_tokens + 7
    assert padded.num_tokens == plain.num_tokens  # throughput counts real tokens only
    assert padded.targets.tolist() == plain.targets.tolist()
    assert padded.target_positions.tolist() == plain.target_positions.tolist()
    cu = padded.cu_seqlens.tolist()
    assert len(cu) == 10 and cu[:7] == [*plain.cu_seqlens.tolist(), plain.num_tokens + 7]
    assert cu[7:] == [plain.num_tokens + 7] * 3  # empty sequences fill the fixed count
    assert padded.max_seqlen == plain.num_tokens + 7
    model = _tiny_lora_model(seed=6)
    runner = fast.PackedCausalLM(model, fast.FastOptions(max_tokens=256))
    assert runner.graphs is None and "CUDA" in runner.graphs_unavailable_reason()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(runner.loss_sum(padded), runner.loss_sum(plain), rtol=1e-5, atol=1e-6)
