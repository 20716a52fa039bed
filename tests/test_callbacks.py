"""keras_metapt.callbacks.MetaCheckpoint: a checkpoint restores into a model built in another
order (Keras' auto-numbered layer names differ between the two builds).

Reference: the saved model's own variable values, compared exactly after the restore.
"""

import numpy as np

from keras_metapt.callbacks import MetaCheckpoint
from tests import meta_pt_toy


def test_checkpoint_restores_when_keras_numbers_layers_differently(tmp_path):
    x, y, x_ft, y_ft, _ = meta_pt_toy.synthetic_tasks(0, n=256)
    saved = meta_pt_toy.build(0, y.shape[1])
    checkpoint = MetaCheckpoint(str(tmp_path / "ckpt"))
    saved.fit(meta_pt_toy.stream(0, x, y, x_ft, y_ft), epochs=1, steps_per_epoch=3, verbose=0,
              callbacks=[checkpoint])
    meta_pt_toy.build(1, y.shape[1])  # an earlier model in the process takes "dense", "dense_1"...
    restored = meta_pt_toy.build(2, y.shape[1])
    assert [v.path for v in restored.variables] != [v.path for v in saved.variables]
    assert checkpoint.restore(restored) == 1
    for (key, a), (key_b, b) in zip(saved.state_variables(), restored.state_variables()):
        assert key == key_b
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=key)
