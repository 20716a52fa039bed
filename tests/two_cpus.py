"""Runs a script with the CPU split into 2 logical devices (for --strategy=mirrored
--devices=/cpu:0,/cpu:1 in app tests):

    python -m tests.two_cpus SCRIPT [ARGS...]
"""

import runpy
import sys

import tensorflow as tf


def split_cpu_in_two():
    """Two logical CPU devices (/cpu:0, /cpu:1); call before TensorFlow initialises devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


if __name__ == "__main__":
    split_cpu_in_two()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
