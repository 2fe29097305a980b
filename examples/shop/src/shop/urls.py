from django.urls import path

from shop import views

urlpatterns = [
    path("", views.index, name="index"),
    path("healthz", views.healthz, name="healthz"),
    path("version", views.version, name="version"),
    path("orders", views.orders, name="orders"),
]
