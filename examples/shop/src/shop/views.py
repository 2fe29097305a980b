"""The shop's pages: `/` (greeting, release, orders), `/healthz`, `/version`, and `POST /orders`."""

from __future__ import annotations

import hmac
import json

from django.conf import settings
from django.db.models import Count, Q
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from shop import health
from shop._version import __version__
from shop.models import Order

__all__ = ["index", "healthz", "version", "orders"]


@require_GET
def index(request):
    try:
        health.check()
    except health.NotReady as e:
        return HttpResponse(f"shop {__version__}: {e}\n", status=503, content_type="text/plain; charset=utf-8")
    counts = Order.objects.aggregate(total=Count("id"), fulfilled=Count("id", filter=Q(fulfilled_at__isnull=False)))
    shop = settings.SHOP
    return render(request, "shop/index.html", {
        "title": shop.title, "greeting": shop.greeting, "version": __version__, "host": shop.host,
        "orders": counts["total"], "fulfilled": counts["fulfilled"],
        "recent": Order.objects.order_by("-id")[:5],
    })


@require_GET
def healthz(request):
    try:
        health.check()
    except health.NotReady as e:
        return HttpResponse(f"{e}\n", status=503, content_type="text/plain; charset=utf-8")
    return HttpResponse("ok\n", content_type="text/plain; charset=utf-8")


@require_GET
def version(request):
    return JsonResponse({"app": "shop", "version": __version__})


def _authorized(request) -> bool:
    token = settings.SHOP.api_token
    given = request.headers.get("Authorization", "")
    # compare_digest on bytes: constant time, and any byte the token holds is compared exactly
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


@csrf_exempt     # an API for machines, authenticated by a bearer token, not by a cookie
@require_POST
def orders(request):
    if not _authorized(request):
        return JsonResponse({"error": "a valid bearer token is required"}, status=401)
    try:
        item = json.loads(request.body)["item"]
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": 'the body must be JSON {"item": "..."}'}, status=400)
    if not isinstance(item, str) or not 0 < len(item) <= 100:
        return JsonResponse({"error": "item must be a string of 1 to 100 characters"}, status=400)
    order = Order.objects.create(item=item)
    return JsonResponse({"id": order.pk, "item": order.item}, status=201)
