"""A real OAuth 2 authorization server for epochflight's tests.

django-oauth-toolkit (DOT) issues the tokens, with refresh-token rotation and
reuse protection on and no grace period: presenting a refresh token that was
already used revokes its whole family (every refresh token descended from
the same login, and their access tokens). A rotation deletes the previous
access token at once, as real servers do, so a request still carrying it
gets a 401 after the refresh.

Served by a threaded WSGI server on 127.0.0.1 (a free port, printed as
`{"port": N}` on the first line of stdout). The server exits when its stdin
closes, so it never outlives the test process that started it.

Tenants are isolated from each other: each has its own client application,
user, token families, counters, access-token lifetime and test controls.

Endpoints (JSON in and out):

  POST /o/token/                  DOT's token endpoint (refresh_token and
                                  password grants; client auth Basic or body)
  ANY  /api/<tenant>/resource     protected resource: 200, or 401 with
                                  `WWW-Authenticate: Bearer error="invalid_token"`
  GET  /test/health               200 once the server is up
  POST /test/tenants              {"name", "access_seconds"} -> client_id,
                                  client_secret, username, password
  GET  /test/<tenant>/counters    the tenant's counters; with
                                  ?until=<counter>&at_least=<n>&timeout=<s>
                                  it waits until the counter reaches n
                                  (408 with the counters if it does not)
  POST /test/<tenant>/expire      every access token of the tenant expires now
  POST /test/<tenant>/revoke      revokes every token family of the tenant
                                  (as an administrator or RFC 7009 would)
  POST /test/<tenant>/hold?count=N  the next N 401 answers of the resource are
                                  held (the verdict is taken, the answer waits)
  POST /test/<tenant>/release     sends every held answer

Counters per tenant: token_calls, refresh_calls, refresh_ok,
refresh_rejected, family_revocations (reuse detections that revoked a live
family), resource_ok, resource_unauthorized, held (answers waiting now),
held_total.
"""

import base64
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
from socketserver import ThreadingMixIn
from urllib.parse import unquote_plus
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import django
from django.conf import settings

DEFAULT_ACCESS_SECONDS = 5
DATA_DIR = tempfile.mkdtemp(prefix="epochflight-oauth-")
# A held answer is sent after this long even if the test never releases it,
# so that a failing test cannot leave threads behind.
HOLD_LIMIT_SECONDS = 60


def access_token_lifetime(request):
    """Seconds an access token of `request`'s client lives: per tenant."""
    tenant = TENANTS.get(request.client.client_id) if request.client else None
    return tenant.access_seconds if tenant else DEFAULT_ACCESS_SECONDS


settings.configure(
    DEBUG=False,
    SECRET_KEY="epochflight-tests-only",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    USE_TZ=True,
    INSTALLED_APPS=[
        "django.contrib.contenttypes",
        "django.contrib.auth",
        "oauth2_provider",
    ],
    MIDDLEWARE=[],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(DATA_DIR, "db.sqlite3"),
            "OPTIONS": {
                # Writers queue instead of failing with "database is locked".
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;",
            },
        }
    },
    # The test users' passwords need no slow hash.
    PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
    OAUTH2_PROVIDER={
        "ROTATE_REFRESH_TOKEN": True,
        "REFRESH_TOKEN_REUSE_PROTECTION": True,
        "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
        "ACCESS_TOKEN_EXPIRE_SECONDS": DEFAULT_ACCESS_SECONDS,
        "EXTRA_SERVER_KWARGS": {"token_expires_in": access_token_lifetime},
        "OAUTH2_VALIDATOR_CLASS": "__main__.CountingValidator",
    },
    LOGGING={"version": 1, "disable_existing_loggers": True},
)
django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.utils import timezone  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from oauth2_provider.models import AccessToken, Application, RefreshToken  # noqa: E402
from oauth2_provider.oauth2_backends import get_oauthlib_core  # noqa: E402
from oauth2_provider.oauth2_validators import OAuth2Validator  # noqa: E402
from oauth2_provider.views import TokenView  # noqa: E402


class Tenant:
    """One client application, its user, counters and test controls."""

    COUNTERS = (
        "token_calls",
        "refresh_calls",
        "refresh_ok",
        "refresh_rejected",
        "family_revocations",
        "resource_ok",
        "resource_unauthorized",
        "held",
        "held_total",
    )

    def __init__(self, name, client_id, access_seconds):
        self.name = name
        self.client_id = client_id
        self.access_seconds = access_seconds
        self.changed = threading.Condition()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.holds_left = 0
        self.release = threading.Event()

    def count(self, counter, by=1):
        with self.changed:
            self.counters[counter] += by
            self.changed.notify_all()

    def snapshot(self):
        with self.changed:
            return dict(self.counters)

    def wait_until(self, counter, at_least, timeout):
        with self.changed:
            return self.changed.wait_for(lambda: self.counters[counter] >= at_least, timeout)

    def take_hold(self):
        """Whether the next 401 answer is to be held, and the event that ends the hold."""
        with self.changed:
            if self.holds_left == 0:
                return None
            self.holds_left -= 1
            return self.release


TENANTS = {}  # client_id -> Tenant
TENANTS_BY_NAME = {}


def checksum(token):
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def live_family(family):
    return RefreshToken.objects.filter(token_family=family, revoked__isnull=True).exists()


class CountingValidator(OAuth2Validator):
    """DOT's validator, counting the reuse detections that revoke a live family."""

    def validate_refresh_token(self, refresh_token, client, request, *args, **kwargs):
        family = (
            RefreshToken.objects.filter(token_checksum=checksum(refresh_token))
            .values_list("token_family", flat=True)
            .first()
        )
        live_before = family is not None and live_family(family)
        valid = super().validate_refresh_token(refresh_token, client, request, *args, **kwargs)
        if not valid and live_before and not live_family(family):
            tenant = TENANTS.get(client.client_id)
            if tenant:
                tenant.count("family_revocations")
        return valid


def client_id_of(request):
    """The client_id of a token request: from Basic authentication, else the body."""
    auth = request.META.get("HTTP_AUTHORIZATION", "")
    if auth.lower().startswith("basic "):
        decoded = base64.b64decode(auth[6:]).decode("utf-8")
        return unquote_plus(decoded.split(":", 1)[0])
    return request.POST.get("client_id")


token_view = TokenView.as_view()


@csrf_exempt
def token(request):
    """DOT's token endpoint, counted per tenant."""
    tenant = TENANTS.get(client_id_of(request))
    refreshing = request.POST.get("grant_type") == "refresh_token"
    if tenant:
        tenant.count("token_calls")
        if refreshing:
            tenant.count("refresh_calls")
    response = token_view(request)
    if tenant and refreshing:
        tenant.count("refresh_ok" if response.status_code == 200 else "refresh_rejected")
    return response


@csrf_exempt
def resource(request, tenant):
    """The protected resource: a valid access token of this tenant, or 401."""
    tenant = TENANTS_BY_NAME.get(tenant)
    if tenant is None:
        return JsonResponse({"error": "no such tenant"}, status=404)
    valid, oauth_request = get_oauthlib_core().verify_request(request, scopes=[])
    if valid and oauth_request.access_token.application.client_id == tenant.client_id:
        tenant.count("resource_ok")
        return JsonResponse({"tenant": tenant.name, "user": oauth_request.user.username})
    tenant.count("resource_unauthorized")
    release = tenant.take_hold()
    if release is not None:
        tenant.count("held")
        tenant.count("held_total")
        release.wait(HOLD_LIMIT_SECONDS)
        tenant.count("held", -1)
    response = JsonResponse({"error": "invalid_token"}, status=401)
    response["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


def health(request):
    return HttpResponse("ok")


@csrf_exempt
def create_tenant(request):
    spec = json.loads(request.body)
    name = spec["name"]
    if name in TENANTS_BY_NAME:
        return JsonResponse({"error": "tenant exists"}, status=409)
    username, password = f"user-{name}", secrets.token_urlsafe(12)
    client_secret = secrets.token_urlsafe(24)
    user = User.objects.create_user(username, password=password)
    app = Application.objects.create(
        name=name,
        user=user,
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_PASSWORD,
        client_secret=client_secret,
        hash_client_secret=False,
    )
    tenant = Tenant(name, app.client_id, int(spec.get("access_seconds", DEFAULT_ACCESS_SECONDS)))
    TENANTS[app.client_id] = TENANTS_BY_NAME[name] = tenant
    return JsonResponse(
        {
            "client_id": app.client_id,
            "client_secret": client_secret,
            "username": username,
            "password": password,
        }
    )


def tenant_control(handler):
    """A test control for one tenant: 404 for an unknown tenant."""

    @csrf_exempt
    def view(request, tenant):
        tenant = TENANTS_BY_NAME.get(tenant)
        if tenant is None:
            return JsonResponse({"error": "no such tenant"}, status=404)
        return handler(request, tenant)

    return view


@tenant_control
def counters(request, tenant):
    until = request.GET.get("until")
    if until is not None:
        if until not in Tenant.COUNTERS:
            return JsonResponse({"error": f"no counter {until}"}, status=400)
        at_least = int(request.GET["at_least"])
        timeout = float(request.GET.get("timeout", "10"))
        if not tenant.wait_until(until, at_least, timeout):
            return JsonResponse(tenant.snapshot(), status=408)
    return JsonResponse(tenant.snapshot())


@tenant_control
def expire(request, tenant):
    expired = timezone.now() - timezone.timedelta(seconds=1)
    n = AccessToken.objects.filter(application__client_id=tenant.client_id).update(expires=expired)
    return JsonResponse({"expired": n})


@tenant_control
def revoke(request, tenant):
    families = set(
        RefreshToken.objects.filter(application__client_id=tenant.client_id, revoked__isnull=True)
        .values_list("token_family", flat=True)
    )
    for family in families:
        RefreshToken.revoke_family(family)
    return JsonResponse({"revoked_families": len(families)})


@tenant_control
def hold(request, tenant):
    with tenant.changed:
        tenant.holds_left = int(request.GET["count"])
        tenant.release = threading.Event()
    return JsonResponse({"holding": tenant.holds_left})


@tenant_control
def release(request, tenant):
    with tenant.changed:
        tenant.holds_left = 0
        tenant.release.set()
    return JsonResponse({"released": True})


urlpatterns = [
    path("o/token/", token),
    path("api/<str:tenant>/resource", resource),
    path("test/health", health),
    path("test/tenants", create_tenant),
    path("test/<str:tenant>/counters", counters),
    path("test/<str:tenant>/expire", expire),
    path("test/<str:tenant>/revoke", revoke),
    path("test/<str:tenant>/hold", hold),
    path("test/<str:tenant>/release", release),
]


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, so held answers do not block the others."""

    daemon_threads = True
    # 200 clients connect at once: a short accept queue would drop SYNs.
    request_queue_size = 1024


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def exit_when_stdin_closes():
    sys.stdin.read()
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    os._exit(0)


def main():
    call_command("migrate", verbosity=0)
    server = make_server(
        "127.0.0.1", 0, WSGIHandler(), server_class=ThreadingWSGIServer, handler_class=QuietHandler
    )
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    print(json.dumps({"port": server.server_port}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
