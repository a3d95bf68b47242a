"""Settings from EPSIGNAL_* variables: types, errors naming the variable, secrets, the README."""

from __future__ import annotations

import pathlib

import pytest

from bridge.config import Settings, describe


def test_values_are_converted_and_unrelated_variables_ignored():
    s = Settings.from_env({"EPSIGNAL_PREFETCH": "7", "EPSIGNAL_DEVICES": " a, b ,,c",
                           "EPSIGNAL_BRIDGE_SERVICE_HOST": "10.0.0.1", "PATH": "/bin"})
    assert s.prefetch == 7 and s.device_list == ["a", "b", "c"]
    assert s.instance_id  # generated


@pytest.mark.parametrize("env,needle", [
    ({"EPSIGNAL_PREFETCH": "many"}, "EPSIGNAL_PREFETCH"),
    ({"EPSIGNAL_PREFETCH": "0"}, "EPSIGNAL_PREFETCH"),
    ({"EPSIGNAL_PBX_MODE": "both"}, "EPSIGNAL_PBX_MODE"),
    ({"EPSIGNAL_INTERCEPT_DEADLINE_MS": "10"}, "EPSIGNAL_INTERCEPT_DEADLINE_MS"),
    ({"EPSIGNAL_INTERCEPT_DEADLINE_MS": "5000"}, "EPSIGNAL_INTERCEPT_DEADLINE_MS"),
    ({"EPSIGNAL_INTERCEPT_FAIL": "shut"}, "EPSIGNAL_INTERCEPT_FAIL"),
    ({"EPSIGNAL_INTERCEPT_CAUSE": "0"}, "EPSIGNAL_INTERCEPT_CAUSE"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ValueError, match=needle):
        Settings.from_env(env)


def test_secrets_never_show_in_repr():
    s = Settings.from_env({"EPSIGNAL_PBX_PASSWORD": "hunter2", "EPSIGNAL_AMQP_URL": "amqp://u:pw9@h/"})
    text = repr(s) + str([s])
    assert "hunter2" not in text and "pw9" not in text
    assert s.pbx_password == "hunter2"  # still usable


def test_readme_documents_every_setting():
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    for name, default, text in describe():
        assert f"| `{name}` | `{default}` | {text} |" in readme, name



@pytest.mark.parametrize("env,needle", [
    ({"EPSIGNAL_PBX_URL": "http://x"}, "EPSIGNAL_PBX_URL 'http://x' is not a ws:// or wss:// URL"),
    ({"EPSIGNAL_AMQP_URL": "foo"}, "EPSIGNAL_AMQP_URL 'foo' is not an amqp:// or amqps:// URL"),
    ({"EPSIGNAL_LOG_LEVEL": "LOUD"}, "EPSIGNAL_LOG_LEVEL 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR"),
    ({"EPSIGNAL_HTTP_PORT": "70000"}, "EPSIGNAL_HTTP_PORT 70000 is not a TCP port"),
    ({"EPSIGNAL_PBX_MODE": "server", "EPSIGNAL_PBX_LISTEN": "8090"}, "EPSIGNAL_PBX_LISTEN '8090' is not host:port"),
    ({"EPSIGNAL_INTERCEPT": "*=setup:phone"},
     "EPSIGNAL_INTERCEPT entry '*=setup:phone': 'setup:phone' needs a direction"),
    ({"EPSIGNAL_INTERCEPT": "*=ring:device"}, "sig type 'ring' is not one of setup"),
])
def test_a_setting_that_cannot_work_refuses_the_start_naming_it(env, needle):
    with pytest.raises(ValueError) as e:
        Settings.from_env(env)
    assert needle in str(e.value)


def test_a_bad_amqp_url_is_shown_with_its_credentials_masked():
    with pytest.raises(ValueError) as e:
        Settings.from_env({"EPSIGNAL_AMQP_URL": "amqps://user:Sup3rS3cret@/vhost"})
    assert "Sup3rS3cret" not in str(e.value) and "amqps://***:***@/vhost" in str(e.value)


def test_the_log_level_is_case_insensitive():
    assert Settings.from_env({"EPSIGNAL_LOG_LEVEL": "debug"}).log_level == "DEBUG"


def test_intercept_rules_from_the_settings():
    s = Settings.from_env({"EPSIGNAL_INTERCEPT": "dev1=conn:pbx;*=setup:device",
                           "EPSIGNAL_INTERCEPT_DEADLINE_MS": "400", "EPSIGNAL_INTERCEPT_FAIL": "closed",
                           "EPSIGNAL_INTERCEPT_CAUSE": "17"})
    rules = s.intercept_rules()
    r = rules.match("any", "setup", True)
    assert (r.deadline_ms, r.fail, r.cause, r.source) == (400, "closed", 17, "config")
    assert rules.match("dev1", "setup", True) is None and rules.match("dev1", "conn", False)
    assert not Settings.from_env({}).intercept_rules().on
