"""convert.py's refusals: one line on stderr, exit status 2, nothing written."""

import dataclasses
import json
import os

import pytest

import convert as convert_cli
from helpers import MICRO

torch = pytest.importorskip('torch')
# pylint: disable=g-import-not-at-top,wrong-import-position
from convert_helpers import (HF_CONFIG, assert_converted, config, convert, layout, lightning,
                             save_safetensors, tiny_bpe, torch_model, torch_state)
# pylint: enable=g-import-not-at-top,wrong-import-position


def _err_extra_keys(tmp_path):
  state = torch_state(torch_model(config()))
  state['teacher.blocks.0.norm1.weight'] = torch.ones(32)
  state['backbone.head.bias'] = torch.ones(3)
  return [save_safetensors(state, str(tmp_path / 'm.safetensors')), '--preset', 'micro']


def _err_missing_key(tmp_path):
  state = torch_state(torch_model(config()))
  del state['backbone.blocks.1.mlp.2.bias']
  return [save_safetensors(state, str(tmp_path / 'm.safetensors')), '--preset', 'micro']


def _err_shape(tmp_path):
  state = torch_state(torch_model(config()))
  state['backbone.blocks.0.attn_out.weight'] = torch.ones(32, 31)
  return [save_safetensors(state, str(tmp_path / 'm.safetensors')), '--preset', 'micro']


def _err_no_ema(tmp_path):
  torch.save({'state_dict': torch_state(torch_model(config()))}, tmp_path / 'm.ckpt')
  return [str(tmp_path / 'm.ckpt'), '--preset', 'micro']


def _err_ema_shape(tmp_path):
  ref = torch_model(config())
  src = lightning(tmp_path, ref, ref)
  ckpt = torch.load(src, weights_only=False)
  ckpt['ema']['shadow_params'][3] = torch.ones(5)
  torch.save(ckpt, src)
  return [str(src), '--preset', 'micro']


def _err_tokenizer(tmp_path):
  cfg = config(dataclasses.replace(MICRO, vocab_size=50258))
  pair, _ = tiny_bpe(tmp_path)  # 300 tokens + mask: not GPT-2's
  return [save_safetensors(torch_state(torch_model(cfg)), str(tmp_path / 'm.safetensors')),
          '--tokenizer_path', str(pair)]


def _err_preset_vocab(tmp_path):
  return [save_safetensors(torch_state(torch_model(config())), str(tmp_path / 'm.safetensors')),
          '--preset', 'owt-small']


def _err_unknown_vocab(tmp_path):
  return [save_safetensors(torch_state(torch_model(config())), str(tmp_path / 'm.safetensors'))]


def _err_inv_freq(tmp_path):
  state = torch_state(torch_model(config()))
  state['backbone.rotary_emb.inv_freq'] = state['backbone.rotary_emb.inv_freq'] ** 0.5
  return [save_safetensors(state, str(tmp_path / 'm.safetensors')), '--preset', 'micro']


def _err_config_json(tmp_path):
  save_safetensors(torch_state(torch_model(config())), str(tmp_path / 'src' / 'model.safetensors'))
  (tmp_path / 'src' / 'config.json').write_text(json.dumps({**HF_CONFIG, 'n_blocks': 3}))
  return [str(tmp_path / 'src'), '--preset', 'micro']


def _err_heads_unknown(tmp_path):
  cfg = config(dataclasses.replace(MICRO, hidden_size=40))  # micro's preset is d=32
  state = torch_state(torch_model(cfg), buffers=False)
  return [save_safetensors(state, str(tmp_path / 'm.safetensors')), '--preset', 'micro']


def _err_set_contradicts(tmp_path):
  return [save_safetensors(torch_state(torch_model(config())), str(tmp_path / 'm.safetensors')),
          '--preset', 'micro', '--set', 'model.hidden_size=64']


def _err_raw_safetensors(tmp_path):
  return [save_safetensors(torch_state(torch_model(config())), str(tmp_path / 'm.safetensors')),
          '--preset', 'micro', '--raw']


@pytest.mark.parametrize('make,message', [
    (_err_extra_keys, "unexpected keys 'head.bias', 'teacher.blocks.0.norm1.weight'"),
    (_err_missing_key, "missing key 'blocks.1.mlp.2.bias'"),
    (_err_shape, 'blocks.0.attn_out.weight: expected shape (32, 32) (transposed), got (31, 32)'),
    (_err_no_ema, 'holds no EMA weights'),
    (_err_ema_shape, 'EMA tensor 3 has shape (5,), its parameter backbone.sigma_map.mlp.2.weight'),
    (_err_tokenizer, 'the tensors V=50258'),
    (_err_preset_vocab, 'the tensors have V=37, but data.tokenizer=gpt2 means V=50258'),
    (_err_unknown_vocab, 'vocabulary size V=37 is not one of the known tokenizers'),
    (_err_inv_freq, 'rotary_emb.inv_freq (4,) is not 1 / 10000^(2i / 8)'),
    (_err_config_json, 'config.json says model.n_blocks=3, the tensors 2'),
    (_err_heads_unknown, 'pass --set model.n_heads=H'),
    (_err_set_contradicts, 'expected shape'),
    (_err_raw_safetensors, '--raw applies to Lightning .ckpt files only'),
])
def test_refusals(make, message, tmp_path, capsys):
  argv = [str(a) for a in make(tmp_path)] + ['--out', str(tmp_path / 'out')]
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    convert_cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
  assert not (tmp_path / 'out').exists()


def test_existing_checkpoint_needs_force(tmp_path, capsys):
  cfg = config()
  first, second = torch_model(cfg, seed=10), torch_model(cfg, seed=11)
  src1 = layout('safetensors', tmp_path / 'a', first)
  src2 = layout('safetensors', tmp_path / 'b', second)
  convert(src1, tmp_path / 'out')
  listing = sorted(os.listdir(tmp_path / 'out' / 'checkpoints'))
  with pytest.raises(SystemExit) as exit_info:
    convert_cli.main([str(src2), '--out', str(tmp_path / 'out'), '--preset', 'micro'])
  assert exit_info.value.code == 2
  assert 'already holds a checkpoint: pass --force' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path / 'out' / 'checkpoints')) == listing
  assert_converted(tmp_path / 'out', first, cfg)
  convert(src2, tmp_path / 'out', force=True)
  assert_converted(tmp_path / 'out', second, cfg)
  assert sorted(os.listdir(tmp_path / 'out')) == ['checkpoints', 'config.json']
