"""One model: an order, placed through POST /orders and fulfilled by the worker."""

from django.db import models
from django.utils import timezone

__all__ = ["Order"]


class Order(models.Model):
    item = models.CharField(max_length=100)
    created_at = models.DateTimeField(default=timezone.now)
    fulfilled_at = models.DateTimeField(null=True, blank=True)
    fulfilled_by = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"order {self.pk}: {self.item}"
