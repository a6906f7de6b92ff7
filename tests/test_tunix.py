"""lpkernel.tunix against the real tunix: per-token log-probabilities and entropy,
the registered GRPO loss, its gradients and aux dict, packed and unpacked rows,
and the compiled temporaries of both, side by side."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tunix = pytest.importorskip("tunix")

import optax  # noqa: E402
from flax import nnx  # noqa: E402
from grain import python as grain  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from tunix.models.gemma3 import model as gemma3  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.models.qwen2 import model as qwen2  # noqa: E402
from tunix.models.qwen3 import model as qwen3  # noqa: E402
from tunix.rl import algo_core, common, function_registry  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402
from tunix.tests import test_common as tunix_test_common  # noqa: E402

import lpkernel as lpk  # noqa: E402
import lpkernel.flax  # noqa: E402, F401
import lpkernel.tunix as lpk_tunix  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

PAD, EOS = 0, 2
SMALL = dict(
  num_layers=2,
  embed_dim=32,
  hidden_dim=64,
  num_heads=4,
  head_dim=8,
  num_kv_heads=2,
  rope_theta=10000,
  norm_eps=1e-6,
)


def _model(family: str, vocab_size: int = 1000):
  if family == "qwen3":
    config = qwen3.ModelConfig(vocab_size=vocab_size, use_tied_embedding=False, **SMALL)
    return qwen3.Qwen3(config, rngs=nnx.Rngs(0))
  if family == "qwen3-tied":
    config = qwen3.ModelConfig(vocab_size=vocab_size, use_tied_embedding=True, **SMALL)
    return qwen3.Qwen3(config, rngs=nnx.Rngs(0))
  if family == "qwen2":
    return qwen2.Qwen2(qwen2.ModelConfig(vocab_size=vocab_size, **SMALL), rngs=nnx.Rngs(0))
  if family == "gemma3":
    sizes = {k: v for k, v in SMALL.items() if k not in ("rope_theta", "norm_eps")}
    config = gemma3.ModelConfig(
      num_embed=vocab_size, sliding_window_size=4, param_dtype=jnp.float32, **sizes
    )
    return gemma3.Gemma3(config, rngs=nnx.Rngs(0))
  config = llama3.ModelConfig(vocab_size=vocab_size, weight_tying=True, **SMALL)
  return llama3.Llama3(config, rngs=nnx.Rngs(0))


def _unpacked(vocab_size=1000, b=2, prompt=6, completion=5, seed=1):
  k = jax.random.split(jax.random.key(seed), 2)
  prompt_ids = jax.random.randint(k[0], (b, prompt), 3, vocab_size).at[0, :2].set(PAD)
  completion_ids = jax.random.randint(k[1], (b, completion), 3, vocab_size).at[1, 3:].set(PAD)
  return prompt_ids, completion_ids


def _packed(vocab_size=1000):
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 3, vocab_size)
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 8 + [2] * 4])
  pos = jnp.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(8)) + list(range(4))])
  mask = jnp.array([[0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])
  return tokens, seg, pos, mask


@pytest.mark.parametrize("family", ["qwen3", "qwen3-tied", "qwen2", "llama3", "gemma3"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logprobs_and_entropy_equal_tunix(family, temperature):
  graphdef, state = nnx.split(_model(family))
  prompt_ids, completion_ids = _unpacked()
  args = (graphdef, state, prompt_ids, completion_ids, PAD, EOS)
  lp_tunix, logits = common.compute_per_token_logps(
    *args, return_logits=True, temperature=temperature
  )
  entropy_tunix = algo_core.compute_entropy_from_logits(logits)
  lp, entropy = lpk_tunix.compute_per_token_logps(
    *args, temperature=temperature, return_entropy=True
  )
  assert_close(lp, lp_tunix, rtol=1e-5, atol=1e-5, what="log-probabilities")
  assert_close(entropy, entropy_tunix, rtol=1e-5, atol=1e-5, what="entropy")
  only_lp = lpk_tunix.compute_per_token_logps(*args, temperature=temperature)
  assert_close(only_lp, lp, rtol=0, atol=0)


def test_packed_rows_equal_tunix():
  graphdef, state = nnx.split(_model("qwen3-tied"))
  tokens, seg, pos, _ = _packed()
  args = (graphdef, state, jnp.zeros((2, 0), jnp.int32), tokens, PAD, EOS)
  kwargs = dict(segment_ids=seg, segment_positions=pos)
  lp_tunix, logits = common.compute_per_token_logps(*args, return_logits=True, **kwargs)
  entropy_tunix = algo_core.compute_entropy_from_logits(logits)
  lp, entropy = lpk_tunix.compute_per_token_logps(*args, return_entropy=True, **kwargs)
  assert lp.shape == lp_tunix.shape == (2, 12)
  assert_close(lp, lp_tunix, rtol=1e-5, atol=1e-5, what="packed log-probabilities")
  # Position 0 predicts nothing: tunix pads its logits with zeros there (entropy log V).
  assert_close(entropy[:, 1:], entropy_tunix[:, 1:], rtol=1e-5, atol=1e-5, what="entropy")


def _config(**kwargs):
  """A GRPOConfig; the fields tunix's loss reads with getattr (epsilon_high,
  epsilon_c) and the temperature GRPOLearner sets are set as attributes, as tunix does."""
  fields = {f.name for f in dataclasses.fields(grpo_learner.GRPOConfig)}
  config = grpo_learner.GRPOConfig(**{k: v for k, v in kwargs.items() if k in fields})
  for key, value in kwargs.items():
    if key not in fields:
      setattr(config, key, value)
  config.temperature = 0.9
  return config


CONFIGS = {
  "grpo-default": dict(),
  "gspo-token": dict(loss_algo="gspo-token", beta=0.0),
  "token-mean-low-var-kl": dict(loss_agg_mode="token-mean", kl_loss_mode="low_var_kl"),
  "scale-mse-kl": dict(loss_agg_mode="sequence-mean-token-scale", kl_loss_mode="mse_kl"),
  "seq-sum": dict(loss_agg_mode="seq-mean-token-sum", beta=0.1),
  "sum-norm-clamped": dict(loss_agg_mode="sequence-mean-token-sum-norm", kl_clamp_value=0.01),
}


def _grpo(name, graphdef, state, example, config):
  loss_fn = function_registry.get_policy_loss_fn(name)

  def loss(state):
    return loss_fn(nnx.merge(graphdef, state), example, config, PAD, EOS)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)


def _compare(graphdef, state, example, config):
  (loss_t, aux_t), grads_t = _grpo("grpo", graphdef, state, example, config)
  (loss, aux), grads = _grpo("lpkernel_grpo", graphdef, state, example, config)
  assert_close(loss, loss_t, rtol=1e-5, atol=1e-6, what="loss")
  for g, g_t in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_t), strict=True):
    assert_close(g, g_t, rtol=1e-4, atol=1e-5, what="gradient")
  assert set(aux) == set(aux_t)
  for key in aux_t:
    assert_close(aux[key], aux_t[key], rtol=1e-5, atol=1e-6, what=key)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grpo_loss_gradients_and_aux_equal_tunix(name):
  graphdef, state = nnx.split(_model("qwen3"))
  prompt_ids, completion_ids = _unpacked()
  lp = common.compute_per_token_logps(graphdef, state, prompt_ids, completion_ids, PAD, EOS)
  k = jax.random.split(jax.random.key(7), 3)
  example = grpo_learner.TrainExample(
    prompt_ids=prompt_ids,
    prompt_mask=prompt_ids != PAD,
    completion_ids=completion_ids,
    completion_mask=(completion_ids != PAD).astype(jnp.int32),
    advantages=jnp.array([1.0, -0.7]),
    ref_per_token_logps=lp + 0.3 * jax.random.normal(k[0], lp.shape),
    old_per_token_logps=lp + 0.3 * jax.random.normal(k[1], lp.shape),
    sampler_is_weights=jax.random.uniform(k[2], lp.shape, minval=0.5, maxval=2.0),
  )
  _compare(graphdef, state, example, _config(epsilon_c=3.0, **CONFIGS[name]))


def test_grpo_loss_on_packed_examples_equals_tunix():
  graphdef, state = nnx.split(_model("qwen3-tied"))
  tokens, seg, pos, mask = _packed()
  lp = common.compute_per_token_logps(
    graphdef, state, jnp.zeros((2, 0), jnp.int32), tokens, PAD, EOS, segment_ids=seg,
    segment_positions=pos,
  )  # fmt: skip
  example = grpo_learner.TrainExample(
    prompt_ids=jnp.zeros((2, 0), jnp.int32),
    prompt_mask=jnp.zeros((2, 0), bool),
    completion_ids=tokens,
    completion_mask=mask,
    advantages=jnp.where(seg == 1, 1.0, -0.5),
    ref_per_token_logps=lp + 0.1,
    old_per_token_logps=lp - 0.2 * (seg == 2),
    segment_ids=seg,
    segment_positions=pos,
  )
  _compare(graphdef, state, example, _config(loss_algo="gspo-token"))


def test_registered_and_refuses_logits():
  assert function_registry.get_policy_loss_fn("lpkernel_grpo") is lpk_tunix.grpo_loss_fn
  graphdef, state = nnx.split(_model("qwen3"))
  prompt_ids, completion_ids = _unpacked()
  with pytest.raises(ValueError, match="return_entropy"):
    lpk_tunix.compute_per_token_logps(
      graphdef, state, prompt_ids, completion_ids, PAD, EOS, return_logits=True
    )
  toy = tunix_test_common.ToyTransformer(tunix_test_common.ModelConfig(), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="bias"):
    lpk_tunix.unembedding(toy)
  objective = lpk_tunix.objective_from_config(_config(epsilon_high=0.28, loss_algo="gspo-token"))
  assert (objective.eps_high, objective.ratio, objective.convention) == (
    0.28,
    "gspo-token",
    "tunix",
  )


def test_grpo_step_temporaries_side_by_side():
  """One GRPO step's gradient, V = 32000, 2 x (128 + 128) tokens, float32: lpkernel's
  compiled temporaries under 10% of tunix's (which hold the [B, T, V] logits)."""
  v, b, prompt, completion = 32000, 2, 128, 128
  graphdef, state = nnx.split(_model("qwen3", v))
  prompt_ids, completion_ids = _unpacked(v, b, prompt, completion)
  lp = jnp.zeros((b, completion))
  example = grpo_learner.TrainExample(
    prompt_ids=prompt_ids,
    prompt_mask=prompt_ids != PAD,
    completion_ids=completion_ids,
    completion_mask=jnp.ones((b, completion), jnp.int32),
    advantages=jnp.array([1.0, -1.0]),
    ref_per_token_logps=lp,
    old_per_token_logps=lp,
  )
  config = _config()

  def temporaries(name):
    loss_fn = function_registry.get_policy_loss_fn(name)

    def step(state):
      return jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s), example, config, PAD, EOS)[0])(
        state
      )

    compiled = jax.jit(step).lower(state).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ours, theirs = temporaries("lpkernel_grpo"), temporaries("grpo")
  logits_bytes = b * completion * v * 4
  print(f"GRPO step temporaries: lpkernel {ours / 2**20:.1f} MiB, tunix {theirs / 2**20:.1f} MiB")
  assert theirs > logits_bytes  # tunix holds the float32 logits (at least once)
  assert ours < 0.10 * theirs, (ours, theirs)
  assert np.isfinite(ours)


def test_routed_tunix_calls_use_lpkernel_unless_they_read_logits():
  graphdef, state = nnx.split(_model("qwen3"))
  prompt_ids, completion_ids = _unpacked()
  args = (graphdef, state, prompt_ids, completion_ids, PAD, EOS)
  original = lpk_tunix._TUNIX_COMPUTE_PER_TOKEN_LOGPS
  assert common.compute_per_token_logps is original  # nothing left it routed
  lpk_tunix.route_log_probabilities()
  try:
    assert common.compute_per_token_logps is not original
    routed = common.compute_per_token_logps(*args, stop_gradient=True, return_logits=False)
    lp_tunix, logits = common.compute_per_token_logps(*args, return_logits=True)
    assert logits.shape[-1] == 1000  # tunix's own path, for its own losses
  finally:
    lpk_tunix.route_log_probabilities(False)
  assert common.compute_per_token_logps is original
  assert_close(routed, lp_tunix, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_model_spec_scores_tunix_models_fused_and_packed(family):
  """lpk.flax.score_model on a tunix model: logits and fused paths equal
  lpk.score on the model's own logits; packed rows equal rows of their own."""
  model = _model(family, 500)
  spec = lpk_tunix.model_spec(model)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 3, 500)
  response = jnp.broadcast_to(jnp.arange(9) >= 4, (2, 9))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  logits = model(tokens, positions, None, jnp.tril(jnp.ones((2, 9, 9), bool)))[0]
  expected = lpk.score(logits, tokens, response)
  for fused in (False, True):
    scores = lpk.flax.score_model(model, tokens, response, spec=spec, fused=fused)
    assert_close(scores.joint_logprob, expected.joint_logprob, rtol=1e-5, atol=1e-5)
  seg = jnp.array([[1] * 4 + [2] * 5] * 2)
  packed = lpk.flax.score_model(
    model, tokens, response, spec=spec, fused=True, segment_ids=seg, num_segments=2
  )
  second = lpk.flax.score_model(model, tokens[:, 4:], response[:, 4:], spec=spec, fused=True)
  assert_close(packed.joint_logprob[:, 1], second.joint_logprob, rtol=1e-5, atol=1e-5)


class _Prompts(grain.RandomAccessDataSource):
  DATA = ["input string", "hello world", "My name", "hello there"] * 2

  def __getitem__(self, i):
    return self.DATA[i]

  def __len__(self):
    return len(self.DATA)


def _train_grpo(policy_loss_fn: str, steps: int = 2):
  """tunix's GRPOLearner on an RLCluster (vanilla rollout engine, tunix's mock
  vocabulary, a tiny Qwen3 actor and reference): the loss and KL it logged per
  step, and the trained parameters."""
  vocab = tunix_test_common.MockVocab()
  config = qwen3.ModelConfig(vocab_size=vocab.GetPieceSize(), use_tied_embedding=True, **SMALL)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
  actor, reference = (qwen3.Qwen3(config, rngs=nnx.Rngs(0)) for _ in range(2))
  roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT)
  cluster = rl_cluster_lib.RLCluster(
    actor=actor,
    reference=reference,
    tokenizer=vocab,
    cluster_config=rl_cluster_lib.ClusterConfig(
      role_to_mesh={role: mesh for role in roles},
      rollout_engine="vanilla",
      offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.sgd(0.1), eval_every_n_steps=100, max_steps=steps
      ),
      rollout_config=base_rollout.RolloutConfig(
        max_tokens_to_generate=6, max_prompt_length=8, kv_cache_size=64, temperature=0.9
      ),
    ),
  )
  learner = grpo_learner.GRPOLearner(
    rl_cluster=cluster,
    reward_fns=lambda prompts, completions, **_: [float(len(c)) for c in completions],
    algo_config=grpo_learner.GRPOConfig(
      num_generations=2, beta=0.04, policy_loss_fn=policy_loss_fn
    ),
  )
  data = grain.MapDataset.source(_Prompts()).batch(2).map(lambda x: {"prompts": x, "answer": x})
  learner.train(data)
  logged = learner.rl_cluster.actor_trainer.metrics_logger
  history = {k: np.asarray(logged.get_metric_history("actor", k, "train")) for k in ("loss", "kl")}
  return history, nnx.state(actor, nnx.Param)


# tunix 0.1.7's training loop uses APIs that jax and optax deprecated (`with mesh:`,
# optax.global_norm, ...): its warnings, not ours.
@pytest.mark.long
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_grpo_learner_trains_the_same_with_lpkernel():
  """One config value switches tunix's own GRPOLearner to lpkernel (its reference
  and old-policy log-probabilities too, routed): the logged losses and KL and the
  trained parameters equal the run with tunix's "grpo"."""
  theirs, params_theirs = _train_grpo("grpo")
  lpk_tunix.route_log_probabilities()
  try:
    ours, params_ours = _train_grpo("lpkernel_grpo")
  finally:
    lpk_tunix.route_log_probabilities(False)
  for key in ("loss", "kl"):
    assert len(ours[key]) == len(theirs[key]) == 2
    assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6, what=key)
  for p, p_t in zip(jax.tree.leaves(params_ours), jax.tree.leaves(params_theirs), strict=True):
    assert_close(p, p_t, rtol=1e-5, atol=1e-6, what="trained parameters")
