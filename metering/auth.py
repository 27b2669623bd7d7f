"""Who may call what: bearer tokens with roles, and TLS, for both gRPC services (metering and renderer).

One implementation that both servers use; the renderer imports it (the two services ship in one
distribution, and this module knows nothing of either core):

- `TokenTable.parse(variable, text, roles)` reads `role:token,role:token` from the environment and refuses
  an unknown role, an empty or short token, or one token under two roles. The table keeps only SHA-256
  digests of the tokens, so nothing it holds can print or log one.
- `AccessPolicy` maps each full method name to the roles that may call it. A role may also be allowed only
  for requests that pass a check of the decoded request (`RequestCheck`): `backend` may read the stats of a
  named user, not system-wide ones. `METERING_ACCESS` and `RENDERER_ACCESS` are the two services' tables,
  side by side so that "who may call what" reads in one place.
- `AuthInterceptor` (grpc.aio): no or malformed or unknown credentials -> UNAUTHENTICATED; a valid token
  whose role may not call the method (or not with this request) -> PERMISSION_DENIED. Health and
  reflection need no credentials, but credentials sent to them must be valid (UNAUTHENTICATED otherwise:
  that is how a renderer's health check finds out its METERING_TOKEN is wrong). Put it before the status
  mapping, so its refusals are not rewritten.
- `ServerTls` / `ClientTls`: certificate files named by the environment -> gRPC credentials.

Importing this module imports grpc but creates no gRPC object (grpc_init runs with the first channel or
server), so config modules may import it before the embedded PostgreSQL forks.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import inspect
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("auth")

MIN_TOKEN_LENGTH = 16
# Visible ASCII without the separator: what a metadata value carries unchanged, and never whitespace.
_TOKEN_CHARS = re.compile(r"^[\x21-\x2b\x2d-\x7e]+$")
# Services anyone may call: orchestrators probe health without credentials; reflection describes the API.
PUBLIC_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


class AuthConfigError(ValueError):
    """Token or certificate settings that cannot work; the message names the variable, never a secret."""


# --- tokens -------------------------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    # surrogatepass: whatever a caller sends maps to distinct bytes; no two strings share a digest input.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenTable:
    """The configured tokens by role, as SHA-256 digests only."""

    def __init__(self, entries: Iterable[tuple[str, bytes]]) -> None:
        self._entries = tuple(entries)

    @classmethod
    def parse(cls, variable: str, text: str, roles: Collection[str]) -> TokenTable:
        """`role:token,role:token,...`; several tokens per role are allowed (rotation)."""
        entries: list[tuple[str, bytes]] = []
        role_of_digest: dict[bytes, str] = {}
        known = ", ".join(sorted(roles))
        for position, item in enumerate(text.split(","), start=1):
            role, sep, token = item.strip().partition(":")
            role, token = role.strip(), token.strip()
            where = f"{variable}: entry {position}"
            if not item.strip():
                raise AuthConfigError(f"{where} is empty (a stray comma?); expected role:token pairs")
            if not sep:
                raise AuthConfigError(f"{where} is not role:token")
            if role not in roles:
                # A long "role" is likely a token written first: do not echo it.
                shown = repr(role) if len(role) < MIN_TOKEN_LENGTH else "(not shown; is the pair reversed?)"
                raise AuthConfigError(f"{where} has an unknown role {shown}; roles: {known}")
            if not token:
                raise AuthConfigError(f"{where} (role {role}) has an empty token")
            if len(token) < MIN_TOKEN_LENGTH:
                raise AuthConfigError(
                    f"{where} (role {role}): the token is shorter than {MIN_TOKEN_LENGTH} characters"
                )
            if not _TOKEN_CHARS.match(token):
                raise AuthConfigError(
                    f"{where} (role {role}): the token may hold only visible ASCII characters, no comma"
                )
            digest = _digest(token)
            other = role_of_digest.setdefault(digest, role)
            if other != role:
                raise AuthConfigError(f"{where}: the same token is listed for roles {other} and {role}")
            entries.append((role, digest))
        return cls(entries)

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(role for role, _ in self._entries)

    def role_of(self, token: str) -> str | None:
        """The role of a presented token, or None. Compares against every configured token in constant
        time, without stopping at a match, so timing tells neither whether nor where a token matched."""
        presented = _digest(token)
        found = None
        for role, digest in self._entries:
            if hmac.compare_digest(presented, digest):
                found = role
        return found

    def __repr__(self) -> str:
        counts = {role: sum(1 for r, _ in self._entries if r == role) for role in sorted(self.roles)}
        return f"TokenTable({counts})"


# --- who may call what --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestCheck:
    """A role that may call a method only with some requests: `allows(request)` sees the decoded request
    (or whatever the inner handler's deserializer made of bytes that did not parse)."""

    allows: Callable[[Any], bool]
    refusal: str


@dataclass(frozen=True, slots=True)
class MethodRule:
    roles: frozenset[str]
    checked: Mapping[str, RequestCheck] = field(default_factory=dict)

    @classmethod
    def of(cls, *roles: str, **checked: RequestCheck) -> MethodRule:
        return cls(frozenset(roles), dict(checked))


class AccessPolicy:
    """Full method name (`/package.Service/Method`) -> `MethodRule`. A method of a non-public service that
    has no rule is refused to every role (deny by default)."""

    def __init__(self, rules: Mapping[str, MethodRule], public_services: Iterable[str] = PUBLIC_SERVICES) -> None:
        self.rules = dict(rules)
        self._public = tuple(f"/{service}/" for service in public_services)

    @classmethod
    def for_service(cls, service: str, rules: Mapping[str, MethodRule]) -> AccessPolicy:
        return cls({f"/{service}/{method}": rule for method, rule in rules.items()})

    @property
    def roles(self) -> frozenset[str]:
        """Every role the table names: the roles a token may be configured for."""
        named: set[str] = set()
        for rule in self.rules.values():
            named |= rule.roles | set(rule.checked)
        return frozenset(named)

    def is_public(self, method: str) -> bool:
        return method.startswith(self._public)

    def rule(self, method: str) -> MethodRule | None:
        return self.rules.get(method)


def _names_a_user(request: Any) -> bool:
    user_id = getattr(request, "user_id", "")
    return isinstance(user_id, str) and bool(user_id)


METERING_SERVICE = "exportapi.metering.v1.Metering"
RENDERER_SERVICE = "exportapi.renderer.v1.Renderer"

METERING_ACCESS = AccessPolicy.for_service(
    METERING_SERVICE,
    {
        "CheckAndReserve": MethodRule.of("renderer", "ops"),
        "Complete": MethodRule.of("renderer", "ops"),
        "ExtendReservation": MethodRule.of("renderer", "ops"),
        "GetUsage": MethodRule.of("backend", "ops"),
        "ListExports": MethodRule.of("backend", "ops"),
        "GetStats": MethodRule.of(
            "ops",
            backend=RequestCheck(
                _names_a_user, "the backend role may read the stats of one named user_id; system-wide stats need ops"
            ),
        ),
        "SetAccountTier": MethodRule.of("ops"),
    },
)
METERING_ROLES = METERING_ACCESS.roles

RENDERER_ACCESS = AccessPolicy.for_service(
    RENDERER_SERVICE,
    {
        "StartRender": MethodRule.of("backend", "ops"),
        "GetRender": MethodRule.of("backend", "ops"),
        "WatchRender": MethodRule.of("backend", "ops"),
        "CancelRender": MethodRule.of("backend", "ops"),
    },
)
RENDERER_ROLES = RENDERER_ACCESS.roles


# --- the interceptor ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    code: grpc.StatusCode
    message: str  # to the caller
    reason: str  # to the log; never the token


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call of a non-public service by its `authorization: Bearer <token>` metadata
    and authorizes it by the token's role."""

    def __init__(self, tokens: TokenTable, policy: AccessPolicy) -> None:
        self._tokens = tokens
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        if self._policy.is_public(method):
            # Open to callers without credentials; credentials that are sent must be valid, so that a caller
            # probing health with a wrong token (a renderer's METERING_TOKEN) learns so, not SERVING.
            if not any(key == "authorization" for key, _ in metadata or ()):
                return handler
            identity = self._authenticate(metadata)
            return _refusing(handler, identity, method, None) if isinstance(identity, Refusal) else handler
        role, decision = self.authorize(method, metadata)
        if decision is None:
            return handler
        if isinstance(decision, RequestCheck):
            assert role is not None
            return _checking(handler, decision, method, role)
        return _refusing(handler, decision, method, role)

    def authorize(
        self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> tuple[str | None, Refusal | RequestCheck | None]:
        """The caller's role (None when it has none) and the verdict on a call of a non-public `method`:
        None (allowed), a `RequestCheck` the decoded request must pass, or a `Refusal`."""
        role = self._authenticate(metadata)
        if isinstance(role, Refusal):
            return None, role
        rule = self._policy.rule(method)
        if rule is not None and role in rule.roles:
            return role, None
        check = rule.checked.get(role) if rule is not None else None
        if check is not None:
            return role, check
        refusal = Refusal(
            grpc.StatusCode.PERMISSION_DENIED, f"the {role} role may not call {_short(method)}", "role not allowed"
        )
        return role, refusal

    def _authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | Refusal:
        """The caller's role, or why it has none."""
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send the metadata authorization: Bearer <token>",
                "no authorization metadata",
            )
        scheme, _, token = values[0].partition(" ") if isinstance(values[0], str) else ("", "", "")
        token = token.strip()
        if len(values) > 1 or scheme.lower() != "bearer" or not token:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed credentials: expected one authorization: Bearer <token>",
                "malformed authorization metadata",
            )
        role = self._tokens.role_of(token)
        if role is None:
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, "invalid credentials", "unknown token")
        return role


def refusal_of(check: RequestCheck) -> Refusal:
    """The refusal of a request that `check` does not allow."""
    return Refusal(grpc.StatusCode.PERMISSION_DENIED, check.refusal, "request not allowed for role")


def _short(method: str) -> str:
    return method.rpartition("/")[2] or method


def log_refusal(context: grpc.aio.ServicerContext, refusal: Refusal, method: str, role: str | None) -> None:
    fields = {"rpc": method, "code": refusal.code.name, "reason": refusal.reason, "peer": context.peer()}
    if role is not None:
        fields["role"] = role
    log.warning("call refused", extra=fields)


def _refusing(
    handler: grpc.RpcMethodHandler, refusal: Refusal, method: str, role: str | None
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses without decoding the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        log_refusal(context, refusal, method, role)
        await context.abort(refusal.code, refusal.message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        log_refusal(context, refusal, method, role)
        await context.abort(refusal.code, refusal.message)
        yield  # pragma: no cover - abort raises

    serializer = handler.response_serializer
    # request_deserializer None: the raw bytes, never parsed for a caller we refuse.
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, response_serializer=serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=serializer)


def _checking(handler: grpc.RpcMethodHandler, check: RequestCheck, method: str, role: str) -> grpc.RpcMethodHandler:
    """`handler`, but refusing requests `check` does not allow. Client-streaming methods have no single
    request to look at, so a checked role is refused there (fail closed)."""
    refusal = refusal_of(check)
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not check.allows(request):
                log_refusal(context, refusal, method, role)
                await context.abort(refusal.code, refusal.message)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=deserializer, response_serializer=serializer
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not check.allows(request):
                log_refusal(context, refusal, method, role)
                await context.abort(refusal.code, refusal.message)
            answer = inner_stream(request, context)
            if inspect.isasyncgen(answer):
                async for item in answer:
                    yield item
            else:  # a handler that writes with context.write()
                await answer

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=deserializer, response_serializer=serializer
        )
    return _refusing(handler, refusal, method, role)


# --- TLS ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecretFile:
    """A PEM file named by an environment variable, read once at start-up."""

    variable: str
    path: Path
    content: bytes = field(repr=False)


def read_pem(env: Mapping[str, str], variable: str, *, kind: str = "CERTIFICATE") -> SecretFile | None:
    """The file `env[variable]` names (None when unset), checked to hold a PEM block of `kind`."""
    raw = (env.get(variable) or "").strip()
    if not raw:
        return None
    path = Path(raw)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise AuthConfigError(f"{variable}={raw}: cannot read it ({error.strerror or error})") from None
    if b"-----BEGIN " not in content or kind.encode() not in content:
        raise AuthConfigError(f"{variable}={raw}: not a PEM file with a {kind}")
    return SecretFile(variable, path, content)


def _pair(cert: SecretFile | None, key: SecretFile | None, cert_variable: str, key_variable: str) -> None:
    if (cert is None) != (key is None):
        raise AuthConfigError(f"{cert_variable} and {key_variable} go together: set both or neither")
    if cert is None or key is None:
        return
    # gRPC would only say "Failed to bind" (server) or fail each handshake (client): check the pair now.
    # The stdlib's OpenSSL does it without creating a gRPC object (config runs before the embedded
    # PostgreSQL forks).
    _check_certificates(cert)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert.path, key.path, password=_no_password)
    except _EncryptedKey:
        raise AuthConfigError(
            f"{key_variable}={key.path}: the key is encrypted; gRPC needs it unencrypted (keep the file 0600)"
        ) from None
    except ssl.SSLError:
        raise AuthConfigError(
            f"{key_variable}={key.path}: not the key of the certificate in {cert_variable}={cert.path}"
        ) from None


def _check_certificates(pem: SecretFile | None) -> None:
    if pem is None:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.content.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise AuthConfigError(f"{pem.variable}={pem.path}: not a readable PEM certificate") from None


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The server's certificate chain and key; with `client_ca`, callers must present a certificate it
    signed (mutual TLS)."""

    certificate: SecretFile
    key: SecretFile
    client_ca: SecretFile | None = None

    @classmethod
    def from_files(
        cls,
        certificate: SecretFile | None,
        key: SecretFile | None,
        client_ca: SecretFile | None,
        *,
        names: tuple[str, str, str],
    ) -> ServerTls | None:
        """`names`: the three variables, for messages when a file is missing (and so has no variable)."""
        cert_variable, key_variable, ca_variable = names
        _pair(certificate, key, cert_variable, key_variable)
        _check_certificates(client_ca)
        if certificate is None or key is None:
            if client_ca is not None:
                raise AuthConfigError(f"{ca_variable} (mutual TLS) needs {cert_variable} and {key_variable}")
            return None
        return cls(certificate, key, client_ca)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.content, self.certificate.content)],
            root_certificates=self.client_ca.content if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client verifies the server (`ca`) and, for mutual TLS, proves itself (`certificate`, `key`)."""

    ca: SecretFile
    certificate: SecretFile | None = None
    key: SecretFile | None = None

    @classmethod
    def from_files(
        cls,
        ca: SecretFile | None,
        certificate: SecretFile | None,
        key: SecretFile | None,
        *,
        names: tuple[str, str, str],
    ) -> ClientTls | None:
        ca_variable, cert_variable, key_variable = names
        _pair(certificate, key, cert_variable, key_variable)
        _check_certificates(ca)
        if ca is None:
            if certificate is not None:
                raise AuthConfigError(f"{cert_variable} (mutual TLS) needs {ca_variable} (the server's CA)")
            return None
        return cls(ca, certificate, key)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.content,
            private_key=self.key.content if self.key else None,
            certificate_chain=self.certificate.content if self.certificate else None,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str], ca: str, certificate: str, key: str) -> ClientTls | None:
        """For command-line clients: the three variables by name."""
        return cls.from_files(
            read_pem(env, ca),
            read_pem(env, certificate),
            read_pem(env, key, kind="PRIVATE KEY"),
            names=(ca, certificate, key),
        )


def channel(target: str, tls: ClientTls | None) -> grpc.aio.Channel:
    """An asyncio channel: TLS when `tls` is given, plaintext otherwise."""
    if tls is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, tls.credentials())


def bearer_metadata(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every unary and server-streaming call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._header = bearer_metadata(token)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)


def sync_channel(target: str, tls: ClientTls | None, token: str | None = None) -> grpc.Channel:
    """A blocking channel (command-line clients): TLS when `tls` is given, plaintext otherwise; with
    `token`, every call carries it as a bearer token."""
    channel = grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target, tls.credentials())
    if token:
        return grpc.intercept_channel(channel, _BearerToken(token))
    return channel
