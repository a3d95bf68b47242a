"""The broker's addresses, from the settings (pure functions, no I/O).

``EPSIGNAL_AMQP_URL`` (a secret) is one URL or a comma-separated list of URLs, one per node of
a RabbitMQ cluster. ``EPSIGNAL_AMQP_HOSTS`` (not secret: a ConfigMap's) is a comma-separated
``host[:port]`` list; when set, each host gets the scheme, credentials, vhost and query options
of the one URL in ``EPSIGNAL_AMQP_URL``, so the credentials stay in the Secret and the nodes in
the configuration. :class:`bridge.amqp.link.BrokerLink` connects to the addresses in turn.
"""

from __future__ import annotations

from yarl import URL

SCHEMES = ("amqp", "amqps")
#: AMQP's ports when a URL names none
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


def split(text: str) -> list[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


def parse_host(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port or None); ValueError."""
    entry = entry.strip()
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if not bracket or (rest and port is None):
            raise ValueError(entry)
    else:
        host, sep, port = entry.partition(":")
        port = port if sep else None
    if not host or any(c in host for c in "/@?#[] "):
        raise ValueError(entry)
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(entry)
    return host, int(port) if port is not None else None


def addresses(url: str, hosts: str = "") -> list[str]:
    """Every address to try, in order (the settings are valid: see :func:`problems`)."""
    urls = split(url)
    if not split(hosts):
        return urls
    base = URL(urls[0])
    out = []
    for entry in split(hosts):
        host, port = parse_host(entry)
        out.append(str(base.with_host(host).with_port(port if port is not None else base.explicit_port)))
    return out


def shown(url: str) -> str:
    """A URL for an error message: user and password masked, everything else as given."""
    try:
        u = URL(url)
    except ValueError:
        return "<not a URL>"
    if u.user or u.password:
        u = u.with_user("***").with_password("***" if u.password else None)
    return str(u)


def endpoint(url: str) -> str:
    """``host:port`` of an address (for logs and metric labels: no credentials at all)."""
    u = URL(url)
    host = f"[{u.host}]" if u.host and ":" in u.host else u.host
    return f"{host}:{u.explicit_port or DEFAULT_PORTS.get(u.scheme, '')}"


def problems(url: str, hosts: str) -> list[str]:
    """What makes these broker settings unable to work, each a sentence naming the variable
    (never showing a password)."""
    out = []
    urls = split(url)
    if not urls:
        out.append("EPSIGNAL_AMQP_URL is empty (e.g. amqp://user:password@rabbitmq:5672/vhost)")
    for text in urls:
        try:
            u = URL(text)
            ok = u.scheme in SCHEMES and bool(u.host)
        except ValueError:
            ok = False
        if not ok:
            out.append(f"EPSIGNAL_AMQP_URL {shown(text)!r} is not an amqp:// or amqps:// URL with a host "
                       "(e.g. amqp://user:password@rabbitmq:5672/vhost; several: comma-separated)")
    if split(hosts):
        if len(urls) > 1:
            out.append("EPSIGNAL_AMQP_HOSTS is set, so EPSIGNAL_AMQP_URL must be one URL (its scheme, "
                       f"credentials, vhost and options are used for each host), not a list of {len(urls)}")
        for entry in split(hosts):
            try:
                parse_host(entry)
            except ValueError:
                where = entry.rpartition("@")[2] if "@" in entry else entry
                out.append(f"EPSIGNAL_AMQP_HOSTS entry {where!r} is not host[:port] "
                           "(e.g. rabbitmq-0.rabbitmq-nodes:5672; the scheme and credentials belong "
                           "in EPSIGNAL_AMQP_URL)")
    return out
