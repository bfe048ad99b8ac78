"""Hub names resolve through huggingface_hub's cache when offline (no hub is reachable from tests)."""
import shutil

import jax.numpy as jnp
import numpy as np

import model as M


def test_hub_name_loads_offline_from_the_cache(hf_t5, tmp_path, monkeypatch):
    ckpt = hf_t5('tiny')
    # the layout huggingface_hub keeps: <cache>/models--org--name/{refs/main, snapshots/<commit>/<files>}
    repo = tmp_path / 'hub' / 'models--someone--tiny-t5'
    snap = repo / 'snapshots' / ('0' * 40)
    shutil.copytree(ckpt.path, snap)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', True)
    cfg, params = M.load_t5('someone/tiny-t5')
    cfg2, params2 = M.load_t5(ckpt.path)
    assert cfg == cfg2
    ids = jnp.array([[5, 6, 7, 1]])
    np.testing.assert_array_equal(M.t5_forward(params, cfg, ids, ids), M.t5_forward(params2, cfg2, ids, ids))
