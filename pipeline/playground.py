"""``GET /playground``: a page to try the platform from a browser.

It asks for an API key, lists the tenant's workers and models (``GET /v1/models``),
streams a prompt over the WebSocket API (``/api/v1/stream``, first-message
authentication, as browsers cannot set headers) and shows the tokens as they
arrive, the time to first token, the token count and the cost. The page is
static: the key stays in the page's memory and goes only to this gateway.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.clickjacking import xframe_options_deny
from django.views.decorators.http import require_GET


@xframe_options_deny
@require_GET
def playground_view(request: HttpRequest) -> HttpResponse:
    return render(request, "pipeline/playground.html")
