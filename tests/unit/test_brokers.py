"""The broker's addresses from EPSIGNAL_AMQP_URL and EPSIGNAL_AMQP_HOSTS, and their errors."""

from __future__ import annotations

import pytest

from bridge import brokers
from bridge.config import Settings


def test_one_url_is_one_address():
    assert Settings.from_env({"EPSIGNAL_AMQP_URL": "amqp://u:p@mq/"}).broker_addresses() == ["amqp://u:p@mq/"]


def test_a_list_of_urls_is_tried_in_its_order():
    s = Settings.from_env({"EPSIGNAL_AMQP_URL": "amqp://u:p@mq-0:5672/v, amqp://u:p@mq-1:5673/v,,"})
    assert s.broker_addresses() == ["amqp://u:p@mq-0:5672/v", "amqp://u:p@mq-1:5673/v"]


def test_hosts_take_the_urls_scheme_credentials_vhost_and_options():
    s = Settings.from_env({"EPSIGNAL_AMQP_URL": "amqps://bridge:s%40cret@ignored:5671/prod?heartbeat=5",
                           "EPSIGNAL_AMQP_HOSTS": "mq-0.mq-nodes, mq-1.mq-nodes:5999,[fd00::1]:5671,10.0.0.3"})
    assert s.broker_addresses() == [
        "amqps://bridge:s%40cret@mq-0.mq-nodes:5671/prod?heartbeat=5",  # the URL's port
        "amqps://bridge:s%40cret@mq-1.mq-nodes:5999/prod?heartbeat=5",
        "amqps://bridge:s%40cret@[fd00::1]:5671/prod?heartbeat=5",
        "amqps://bridge:s%40cret@10.0.0.3:5671/prod?heartbeat=5",
    ]
    assert [brokers.endpoint(a) for a in s.broker_addresses()] == [
        "mq-0.mq-nodes:5671", "mq-1.mq-nodes:5999", "[fd00::1]:5671", "10.0.0.3:5671"]


def test_a_url_without_port_has_amqps_default_port_in_its_endpoint():
    assert brokers.endpoint("amqp://u:p@mq/") == "mq:5672"
    assert brokers.endpoint("amqps://mq/") == "mq:5671"
    assert Settings.from_env({"EPSIGNAL_AMQP_URL": "amqp://u:p@x/", "EPSIGNAL_AMQP_HOSTS": "a,b:1"}
                             ).broker_addresses() == ["amqp://u:p@a/", "amqp://u:p@b:1/"]


@pytest.mark.parametrize("env,needle", [
    ({"EPSIGNAL_AMQP_URL": "amqp://u:pw1@a/,http://u:pw1@b/"},
     "EPSIGNAL_AMQP_URL 'http://***:***@b/' is not an amqp:// or amqps:// URL"),
    ({"EPSIGNAL_AMQP_URL": " , "}, "EPSIGNAL_AMQP_URL is empty"),
    ({"EPSIGNAL_AMQP_URL": "amqp://u:pw1@a:99999/"}, "EPSIGNAL_AMQP_URL '<not a URL>' is not"),
    ({"EPSIGNAL_AMQP_URL": "amqp://u:pw1@a/,amqp://u:pw1@b/", "EPSIGNAL_AMQP_HOSTS": "c"},
     "EPSIGNAL_AMQP_HOSTS is set, so EPSIGNAL_AMQP_URL must be one URL"),
    ({"EPSIGNAL_AMQP_HOSTS": "mq-0,amqp://u:pw1@mq-1"}, "EPSIGNAL_AMQP_HOSTS entry 'mq-1' is not host[:port]"),
    ({"EPSIGNAL_AMQP_HOSTS": "mq-0:http"}, "EPSIGNAL_AMQP_HOSTS entry 'mq-0:http' is not host[:port]"),
    ({"EPSIGNAL_AMQP_HOSTS": "mq-0:0"}, "EPSIGNAL_AMQP_HOSTS entry 'mq-0:0' is not host[:port]"),
    ({"EPSIGNAL_AMQP_HOSTS": "mq/0"}, "EPSIGNAL_AMQP_HOSTS entry 'mq/0' is not host[:port]"),
    ({"EPSIGNAL_AMQP_HOSTS": "[fd00::1"}, "EPSIGNAL_AMQP_HOSTS entry '[fd00::1' is not host[:port]"),
    ({"EPSIGNAL_QUEUE_TYPE": "mirrored"}, "EPSIGNAL_QUEUE_TYPE"),
])
def test_bad_broker_settings_are_named_and_never_show_a_password(env, needle):
    with pytest.raises(ValueError) as e:
        Settings.from_env(env)
    assert needle in str(e.value)
    assert "pw1" not in str(e.value)


def test_every_password_of_a_list_is_a_secret_for_the_log_filter():
    s = Settings.from_env({"EPSIGNAL_AMQP_URL": "amqp://u:first-pw@a/,amqp://u:second%21pw@b/"})
    assert {"first-pw", "second!pw", "amqp://u:second%21pw@b/"} <= set(s.secrets())


def test_the_queue_type_is_quorum_unless_classic_is_asked_for():
    assert Settings.from_env({}).queue_type == "quorum"
    assert Settings.from_env({"EPSIGNAL_QUEUE_TYPE": "classic"}).queue_type == "classic"
