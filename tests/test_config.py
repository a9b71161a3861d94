"""Configs (`config.py`): presets, `--set` overrides, validation of every section, and saved
configs read back (old key names included)."""

import dataclasses

import pytest

from imdm_jax import config as config_lib
from imdm_jax import presets
from imdm_jax.config import Config, SdttConfig
from imdm_jax.errors import UserError


def test_config_round_trip_and_overrides():
  cfg = config_lib.resolve('lm1b-small', ['train.batch_size=64', 'model.attn_softcap=50',
                                          'data.wrap=true'])
  assert cfg.train.batch_size == 64 and cfg.model.attn_softcap == 50.0 and cfg.data.wrap
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
  for bad, msg in [(['train.batch_size=1.5'], 'expected int'), (['train.nope=1'], 'unknown key'),
                   (['bogus.x=1'], 'unknown config section'), (['data.wrap=maybe'], 'bool'),
                   (['model.n_heads=5'], 'heads')]:
    with pytest.raises(UserError, match=msg):
      config_lib.resolve('tiny', bad)
  with pytest.raises(UserError, match='unknown preset'):
    config_lib.resolve('huge')


@pytest.mark.parametrize('name', sorted(presets.PRESETS))
def test_every_preset_is_valid_and_round_trips(name):
  cfg = config_lib.resolve(name)
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


def test_distillation_sections_from_the_command_line():
  with pytest.raises(UserError, match='sdtt.base_steps'):
    config_lib.resolve('micro', ['sdtt.base_steps=0'])
  assert config_lib.resolve('micro', ['sdtt.teacher_grid=slip']).sdtt.teacher_grid == 'slip'
  cfg = config_lib.resolve('micro', ['redi.final=greedy', 'redi.fix_eps=true', 'redi.rounds=3'])
  assert (cfg.redi.final, cfg.redi.fix_eps, cfg.redi.rounds) == ('greedy', True, 3)
  # the default schedule of rounds ends at a student of at least one step
  sdtt = SdttConfig()
  assert sdtt.base_steps >= 2 ** sdtt.num_rounds


def test_indivisible_micro_batches_are_user_errors(micro_cfg):
  with pytest.raises(UserError, match=r'^train.batch_size=16 is not divisible by '
                                      r'train.grad_accum=3$'):
    config_lib.apply_overrides(micro_cfg, ['train.grad_accum=3']).validate()


def test_bfloat16_is_the_only_other_dtype():
  with pytest.raises(UserError, match="model.dtype='float16': expected one of"):
    config_lib.resolve('micro', ['model.dtype=float16'])


# (overrides, the key the one-line refusal names): every check of every section's `validate()`
BAD_VALUES = [
    (['model.n_heads=5'], 'model.n_heads'),
    (['model.hidden_size=30'], 'model.hidden_size'),  # 2 heads of odd size 15
    (['model.noise_dim=-1'], 'model.noise_dim'),
    (['model.arch=x'], 'model.arch'),
    (['model.dtype=float16'], 'model.dtype'),
    (['diffusion.noise_type=x'], 'diffusion.noise_type'),
    (['diffusion.noise_type=learnable', 'diffusion.noise_scale=2'], 'diffusion.noise_scale'),
    (['diffusion.num_mask_states=-1'], 'diffusion.num_mask_states'),
    (['data.data_dir=gs://bucket/data'], 'data.data_dir'),
    (['data.tokenizer_path=gs://bucket/vocab'], 'data.tokenizer_path'),
    (['data.seq_len=2'], 'data.seq_len'),
    (['optim.decay_steps=5'], 'optim.decay_steps'),  # not after micro's 10 warm-up steps
    *[([f'train.{key}=0'], f'train.{key}') for key in ('batch_size', 'num_steps', 'log_every',
                                                        'eval_every', 'ckpt_every', 'grad_accum')],
    (['train.grad_accum=3'], 'train.grad_accum'),
    (['sdtt.divergence=x'], 'sdtt.divergence'),
    (['sdtt.teacher_grid=x'], 'sdtt.teacher_grid'),
    *[([f'sdtt.{key}=0'], f'sdtt.{key}') for key in ('round_steps', 'num_rounds', 'base_steps')],
    *[([f'redi.{key}=0'], f'redi.{key}') for key in ('num_pairs', 'sampler_steps', 'rounds')],
    (['redi.final=x'], 'redi.final'),
    (['redi.temperature=0'], 'redi.temperature'),
    (['redi.full_mask_fraction=2'], 'redi.full_mask_fraction'),
    (['redi.full_mask_fraction=-0.1'], 'redi.full_mask_fraction'),
]


@pytest.mark.parametrize('overrides,key', BAD_VALUES, ids=[' '.join(o) for o, _ in BAD_VALUES])
def test_each_section_refuses_its_bad_values_naming_the_key(overrides, key):
  cfg = config_lib.apply_overrides(config_lib.resolve('micro'), overrides)
  section = getattr(cfg, key.split('.')[0])
  with pytest.raises(UserError) as refused:
    section.validate()
  message = str(refused.value)
  assert key in message and '\n' not in message, message
  with pytest.raises(UserError, match=key):  # and so does the config, and `resolve`
    cfg.validate()
  with pytest.raises(UserError, match=key):
    config_lib.resolve('micro', overrides)


@pytest.mark.parametrize('overrides,key', [
    (['model.arch=gpt2', 'model.noise_dim=8'], 'model.arch=gpt2'),
    (['model.arch=gpt2', 'diffusion.num_mask_states=2'], 'model.arch=gpt2'),
    (['diffusion.num_mask_states=2', 'model.noise_dim=8'], 'diffusion.num_mask_states'),
])
def test_settings_that_exclude_each_other_are_refused(overrides, key):
  cfg = config_lib.apply_overrides(config_lib.resolve('micro'), overrides)
  for f in dataclasses.fields(cfg):
    getattr(cfg, f.name).validate()  # each section alone is fine
  with pytest.raises(UserError, match=key) as refused:
    cfg.validate()
  assert '\n' not in str(refused.value)


@pytest.mark.parametrize('item,named', [
    ('bogus.x=1', "'bogus'"),
    ('sdtt.nope=1', "'nope'"),
    ('redi.teacher_steps=4', "'teacher_steps'"),  # old names load from saved configs only
    ('distill.num_pairs=4', "'distill'"),
    ('diffusion.eps=1e-3', "'eps'"),
    ('train.batch_size', 'section.key=value'),
    ('batch_size=4', 'section.key=value'),
])
def test_set_of_an_unknown_section_or_key_is_refused_naming_it(item, named):
  with pytest.raises(UserError) as refused:
    config_lib.apply_overrides(Config(), [item])
  assert named in str(refused.value) and '\n' not in str(refused.value)


# A config as saved before the `distill` section split and the `diffusion.eps` rename.
OLD_DISTILL = {'round_steps': 500, 'num_rounds': 3, 'divergence': 'tvd', 'teacher_grid': 'slip',
               'teacher_base_steps': 64, 'num_pairs': 123, 'teacher_steps': 17,
               'teacher_temperature': 0.5, 'teacher_final': 'greedy', 'teacher_fix_eps': True,
               'full_mask_fraction': 0.25, 'ignore_seed': True, 'reflow_rounds': 4}


def _old_saved_config() -> dict:
  d = config_lib.to_dict(config_lib.resolve('micro'))
  del d['sdtt'], d['redi']
  d['diffusion']['eps'] = 2e-3
  del d['diffusion']['alpha_min']
  d['distill'] = dict(OLD_DISTILL)
  return d


def test_from_dict_upgrades_an_old_saved_config():
  cfg = config_lib.from_dict(_old_saved_config())
  expected = dataclasses.replace(
      config_lib.resolve('micro'),
      diffusion=dataclasses.replace(config_lib.resolve('micro').diffusion, alpha_min=2e-3),
      sdtt=config_lib.SdttConfig(round_steps=500, num_rounds=3, divergence='tvd',
                                 teacher_grid='slip', base_steps=64),
      redi=config_lib.RediConfig(num_pairs=123, sampler_steps=17, temperature=0.5, final='greedy',
                                 fix_eps=True, full_mask_fraction=0.25, ignore_seed=True,
                                 rounds=4))
  assert cfg == expected
  cfg.validate()
  # every old key has a new home, and the upgraded config saves under the new names only
  assert {(s, k) for s, k in config_lib._RENAMED} == (  # pylint: disable=protected-access
      {('distill', k) for k in OLD_DISTILL} | {('diffusion', 'eps')})
  saved = config_lib.to_dict(cfg)
  assert 'distill' not in saved and 'eps' not in saved['diffusion']
  assert config_lib.from_dict(saved) == cfg


@pytest.mark.parametrize('edit,named', [
    (lambda d: d['model'].update(nope=1), 'model.nope'),
    (lambda d: d['distill'].update(teacher_nope=1), 'distill'),  # an old section's unknown key
    (lambda d: d.update(bogus={'x': 1}), 'bogus'),
    (lambda d: d['train'].update(reflow_rounds=2), 'train.reflow_rounds'),  # distill's only
])
def test_from_dict_refuses_unknown_keys_and_sections_naming_them(edit, named):
  d = _old_saved_config()
  edit(d)
  with pytest.raises(UserError, match=named) as refused:
    config_lib.from_dict(d)
  assert '\n' not in str(refused.value)


@pytest.mark.parametrize('override,key', [
    ('optim.lr=-1', 'optim.lr'), ('optim.lr=nan', 'optim.lr'), ('optim.lr=inf', 'optim.lr'),
    ('optim.warmup_steps=-5', 'optim.warmup_steps'), ('optim.b2=1.0', 'optim.b2'),
    ('optim.eps=0', 'optim.eps'), ('optim.grad_clip=0', 'optim.grad_clip'),
    ('optim.ema_decay=1.5', 'optim.ema_decay'), ('optim.weight_decay=-0.1', 'optim.weight_decay'),
    ('model.dropout=2', 'model.dropout'), ('model.dropout=1', 'model.dropout'),
    ('model.attn_softcap=-1', 'model.attn_softcap'), ('model.vocab_size=1', 'model.vocab_size'),
    ('model.n_blocks=0', 'model.n_blocks'), ('diffusion.alpha_min=0', 'diffusion.alpha_min'),
    ('diffusion.noise_scale=nan', 'diffusion.noise_scale'),
    ('train.keep_checkpoints=0', 'train.keep_checkpoints'), ('train.seed=-1', 'train.seed'),
    ('train.eval_batches=-1', 'train.eval_batches'), ('redi.temperature=nan', 'redi.temperature'),
    ('redi.temperature=inf', 'redi.temperature'), ('sdtt.stratum_rows=-1', 'sdtt.stratum_rows'),
])
def test_nonsense_values_are_refused_naming_the_key(override, key):
  with pytest.raises(UserError, match=key.replace('.', r'\.')):
    config_lib.resolve('tiny', [override])
