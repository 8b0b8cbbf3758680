"""What every API view shares: errors as 400/409 with the field named, and role permissions."""

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, permissions, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from labeling.services import SubmissionRefused

logger = logging.getLogger(__name__)


def exception_handler(exc, context):
    """Django ValidationErrors from the services become 400s keyed by field; a refused submission is a 409."""
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        exc = exceptions.ValidationError(detail)
    elif isinstance(exc, SubmissionRefused):
        return Response({"detail": str(exc), "code": "refused"}, status=status.HTTP_409_CONFLICT)
    return drf_exception_handler(exc, context)


class IsAdmin(permissions.BasePermission):
    """Admins are staff users: they use Django admin and the ops pages."""

    message = "Only admins may do this."

    def has_permission(self, request, view):
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into text."""

    default_error_messages = {"invalid": "Not a valid string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)
