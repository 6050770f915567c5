"""Options: Cinder's names coexist with Cinder's registration; the shipped sample is current."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from oslo_config import cfg

from cinder_cgroup_throttle import opts
from cinder_cgroup_throttle.backends import CHOICES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, 'doc', 'cinder-cgroup-throttle.conf.sample')


@pytest.mark.cinder
def test_cinder_named_options_equal_cinders_own():
    from cinder.volume import driver
    cinders = {o.name: o for o in driver.volume_opts}
    for opt in opts.cinder_opts:
        assert opt == cinders[opt.name], opt.name


REGISTER_OURS = """
from oslo_config import cfg
from cinder_cgroup_throttle import opts
opts.register_opts(cfg.CONF, 'lvm-1')
"""
REGISTER_CINDERS = """
from oslo_config import cfg
from cinder.volume import configuration, driver
conf = configuration.Configuration(driver.volume_opts, config_group='lvm-1')
conf.append_config_values(driver.volume_opts)
"""


@pytest.mark.cinder
@pytest.mark.parametrize('first, second', [(REGISTER_OURS, REGISTER_CINDERS),
                                           (REGISTER_CINDERS, REGISTER_OURS)],
                         ids=['ours-first', 'cinders-first'])
def test_registration_in_either_order(tmp_path, first, second):
    import cinder.volume.driver  # noqa: F401 (installed with requirements.txt)
    conf = tmp_path / 'cinder.conf'
    conf.write_text('[lvm-1]\nvolume_copy_bps_limit = 4096\n'
                    '[backend_defaults]\nvolume_copy_host_bps_limit = 8Mi\n')
    script = first + second + textwrap.dedent("""
        import sys
        from cinder_cgroup_throttle import policy
        cfg.CONF([], default_config_files=[sys.argv[1]])
        c = policy.load_config(cfg.CONF, 'lvm-1')
        print(c.bps_limit, c.host_bps_limit, c.cgroup_name)
        """)
    proc = subprocess.run([sys.executable, '-c', script, str(conf)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ['4096', str(8 * 2**20), 'cinder-volume-copy']


def test_shipped_sample_is_current():
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable),
                                        'oslo-config-generator'),
                           '--namespace', 'cinder_cgroup_throttle'],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open(SAMPLE) as f:
        assert f.read() == proc.stdout, (
            'regenerate it: tox -e genconfig (or oslo-config-generator --namespace '
            'cinder_cgroup_throttle --output-file %s)' % SAMPLE)


def test_backend_choices_are_the_managers():
    opt = {o.name: o for o in opts.ALL_OPTS}['volume_copy_throttle_backend']
    assert tuple(opt.type.choices) == CHOICES


def test_metadata_key_option_exists_and_names_metadata():
    names = [o.name for o in opts.ALL_OPTS if 'metadata' in o.name]
    assert names == ['volume_copy_bps_limit_metadata_key']


@pytest.mark.parametrize('text, value', [('12Mi', 12 * 2**20), ('10M', 10**7),
                                         ('1.5Gi', 3 * 2**29), ('4096', 4096),
                                         ('8MiB/s', 8 * 2**20)])
def test_rate_options_accept_units(tmp_path, text, value):
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    path = tmp_path / 'c.conf'
    path.write_text('[DEFAULT]\nvolume_copy_host_bps_limit = %s\n' % text)
    conf([], default_config_files=[str(path)])
    assert conf.volume_copy_host_bps_limit == value


def test_rate_option_rejects_garbage(tmp_path):
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    path = tmp_path / 'c.conf'
    path.write_text('[DEFAULT]\nvolume_copy_read_bps_limit = fast\n')
    conf([], default_config_files=[str(path)])
    with pytest.raises(cfg.ConfigFileValueError, match='volume_copy_read_bps_limit'):
        conf.volume_copy_read_bps_limit
