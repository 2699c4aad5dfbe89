"""Requests TaskFlow makes to URLs its users give (webhooks): the SSRF rule,
a connection to exactly the address checked, and Standard Webhooks signatures.

The rule: a URL is `https://` and every address its host resolves to is a
public one, unless ``TASKFLOW_WEBHOOK_ALLOW_PRIVATE`` allows `http://` and
any address. It is checked when a webhook is registered and again at every
delivery, where the request then goes to the very address checked (the URL's
host replaced by it, the name kept in `Host` and, for TLS, in SNI and the
certificate check), so that DNS answering differently a moment later (DNS
rebinding) cannot send it elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

MAX_URL_LENGTH = 2048
REQUEST_TIMEOUT_SECONDS = 10.0
# Registration looks the host up within a request: briefly.
RESOLVE_TIMEOUT_SECONDS = 3.0
SECRET_PREFIX = "whsec_"  # noqa: S105  # nosec B105: a prefix, not a secret
SECRET_BYTES = 32
USER_AGENT = "TaskFlow-Webhooks/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 forms that carry an IPv4 address, judged by the address they carry:
# NAT64's well-known prefix (RFC 6052) and the deprecated IPv4-compatible
# form (::a.b.c.d); IPv4-mapped (::ffff:a.b.c.d) and 6to4 (2002::/16) have
# ipaddress properties of their own.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


class Refused(ValueError):
    """A URL or an address the rule refuses; the message says why, for the
    webhook's owner (a 422 at registration, the delivery log afterwards)."""


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):  # not :: or ::1
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def kind_refused(address: IPAddress) -> str | None:
    """What kind of address *address* is, if deliveries may not go there."""
    v6 = isinstance(address, ipaddress.IPv6Address)
    for kind, applies in (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a unique-local", v6 and address in UNIQUE_LOCAL),
        ("a site-local", v6 and address.is_site_local),  # type: ignore[union-attr]
        ("a multicast", address.is_multicast),
        ("a private", address.is_private),
        ("a reserved", address.is_reserved),
        ("not a globally reachable", not address.is_global),
    ):
        if applies:
            return f"{kind} address"
    return None


def refusal(address: IPAddress) -> str | None:
    """Why *address* may not receive deliveries, or None when it may. An IPv6
    address that carries an IPv4 one is judged by that one first."""
    if isinstance(address, ipaddress.IPv6Address):
        carried = embedded_ipv4(address)
        if carried is not None and (kind := kind_refused(carried)) is not None:
            return f"{address} carries {carried}, {kind}"
    kind = kind_refused(address)
    return f"{address} is {kind}" if kind is not None else None


def parse_url(url: str, allow_private: bool) -> httpx.URL:
    """*url* parsed, if its form is one TaskFlow delivers to; else ``Refused``."""
    if len(url) > MAX_URL_LENGTH:
        raise Refused(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise Refused("is not a valid URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parsed.scheme not in schemes:
        raise Refused("must be an https:// URL")
    if not parsed.host:
        raise Refused("must name a host")
    if parsed.userinfo:
        raise Refused("must not carry credentials (put a secret in the path, or verify signatures)")
    if parsed.fragment:
        raise Refused("must not have a fragment")
    return parsed


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def resolve(url: httpx.URL) -> list[IPAddress]:
    """The addresses of *url*'s host, in the resolver's order, each once."""
    literal = ip_literal(url.host)
    if literal is not None:
        return [literal]
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            url.raw_host.decode("ascii"), port, type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError) as error:
        raise Refused(f"its host does not resolve ({error})") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        # Strip an IPv6 zone (fe80::1%eth0): ipaddress judges the address.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise Refused("its host does not resolve")
    return addresses


def check_addresses(addresses: Sequence[IPAddress]) -> None:
    """Refuse unless every address is a public one (a host with one private
    address among public ones is refused: which one a connection would get
    is not ours to choose)."""
    for address in addresses:
        reason = refusal(address)
        if reason is not None:
            raise Refused(f"must not lead to a private address: {reason}")


async def check_url(url: str, allow_private: bool) -> str:
    """At registration: *url* if TaskFlow may deliver to it; else ``Refused``."""
    parsed = parse_url(url, allow_private)
    if not allow_private:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
                addresses = await resolve(parsed)
        except TimeoutError:
            raise Refused("its host did not resolve in time") from None
        check_addresses(addresses)
    return url


@dataclass(frozen=True)
class Destination:
    """Where one delivery goes: the URL as registered, and the addresses of
    its host, checked, to connect to in turn."""

    url: httpx.URL
    addresses: tuple[IPAddress, ...]

    def request_url(self, address: IPAddress) -> httpx.URL:
        return self.url.copy_with(host=str(address))

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")

    @property
    def extensions(self) -> dict[str, str]:
        """TLS is checked against the URL's name, not the address connected to."""
        if self.url.scheme == "https" and ip_literal(self.url.host) is None:
            return {"sni_hostname": self.url.raw_host.decode("ascii")}
        return {}


async def destination(url: str, allow_private: bool) -> Destination:
    """At delivery: where *url* leads now, checked; else ``Refused``."""
    parsed = parse_url(url, allow_private)
    addresses = await resolve(parsed)
    if not allow_private:
        check_addresses(addresses)
    return Destination(parsed, tuple(addresses))


@dataclass(frozen=True)
class Answer:
    status_code: int
    retry_after: str | None


def client() -> httpx.AsyncClient:
    """The HTTP client of a process's deliveries: no redirects, no proxies
    from the environment (they would connect elsewhere), the system's
    certificate store, and no kept connections (a connection is made for one
    checked address and one name, so none is reused for another). httpx's
    own request lines are silenced (``logs.configure_logging``).
    """
    return httpx.AsyncClient(
        verify=ssl.create_default_context(),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(REQUEST_TIMEOUT_SECONDS),
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": USER_AGENT},
    )


async def post(
    http: httpx.AsyncClient, target: Destination, headers: dict[str, str], body: bytes
) -> Answer:
    """POST *body* to *target*: to its first address that accepts a
    connection (a refused connection sent nothing, so the next address is
    tried). The caller bounds the whole with a deadline; the response's body
    is not read."""
    failure: httpx.ConnectError | None = None
    for address in target.addresses:
        try:
            async with http.stream(
                "POST",
                target.request_url(address),
                content=body,
                headers={**headers, "Host": target.host_header},
                extensions=target.extensions,
            ) as response:
                return Answer(response.status_code, response.headers.get("Retry-After"))
        except httpx.ConnectError as error:
            failure = error
    assert failure is not None  # nosec B101: a destination has at least one address
    raise failure


# Standard Webhooks (https://www.standardwebhooks.com/): secrets and signatures.


def new_secret() -> str:
    """A signing secret: `whsec_` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,` and the base64 HMAC-SHA256 of `<id>.<timestamp>.<body>`, keyed
    with the secret's base64-decoded bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    signing_secrets: Sequence[str], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The headers of a delivery: one signature per secret, space-separated."""
    return {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(
            signature(secret, message_id, timestamp, body) for secret in signing_secrets
        ),
    }
