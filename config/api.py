"""What every API view shares: errors as 400/409 with the field named, and role permissions."""

import codecs
import json
import logging

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, parsers, permissions, serializers, status
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


class BodyTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"


def read_bounded(stream, parser_context) -> tuple[bytes, str]:
    """The request body, at most API_MAX_JSON_BYTES (a 413 beyond), and its encoding."""
    limit = settings.API_MAX_JSON_BYTES
    raw = stream.read(limit + 1) if stream is not None else b""
    if len(raw) > limit:
        raise BodyTooLarge(f"The request body is larger than {limit} bytes.")
    return raw, (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)


class BoundedJSONParser(parsers.JSONParser):
    """DRF's JSON parser reads the request stream itself, past Django's DATA_UPLOAD_MAX_MEMORY_SIZE: this one reads
    at most API_MAX_JSON_BYTES (a 413 beyond), and answers JSON nested too deeply for Python's parser with a 400
    instead of a RecursionError."""

    def parse(self, stream, media_type=None, parser_context=None):
        raw, encoding = read_bounded(stream, parser_context)
        try:
            text = codecs.decode(raw, encoding)
            return json.loads(text, parse_constant=_no_constant) if text.strip() else {}
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - nested too deeply.") from None
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None


def _declared_length(parser_context) -> int:
    request = (parser_context or {}).get("request")
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0) if request is not None else 0
    except ValueError:
        return 0


class BoundedFormParser(parsers.FormParser):
    """DRF's form parser reads the whole stream: this one at most API_MAX_JSON_BYTES (a 413 beyond)."""

    def parse(self, stream, media_type=None, parser_context=None):
        from django.http import QueryDict

        raw, encoding = read_bounded(stream, parser_context)
        return QueryDict(raw, encoding=encoding)


class BoundedMultiPartParser(parsers.MultiPartParser):
    """A multipart body (files included) of at most `limit()` bytes, API_MAX_JSON_BYTES unless a view says more:
    Django bounds a form's fields but not its files, so a 30 MB file posted to any endpoint was read and kept."""

    def limit(self) -> int:
        return settings.API_MAX_JSON_BYTES

    def parse(self, stream, media_type=None, parser_context=None):
        limit = self.limit()
        if _declared_length(parser_context) > limit:
            raise BodyTooLarge(f"The request body is larger than {limit} bytes.")
        return super().parse(stream, media_type, parser_context)


class ImportMultiPartParser(BoundedMultiPartParser):
    """The import upload: the file may be IMPORT_MAX_FILE_BYTES, with a megabyte for the form around it."""

    def limit(self) -> int:
        return settings.IMPORT_MAX_FILE_BYTES + 1_000_000


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class StaffSeesMore:
    """A view mixin: admins get `staff_serializer_class`, everyone else `serializer_class` (fewer fields)."""

    staff_serializer_class = None

    def get_serializer_class(self):
        user = getattr(self.request, "user", None)
        admin = user is not None and user.is_authenticated and user.has_perm("training_jobs.operate_loop")
        if admin and self.staff_serializer_class is not None:
            return self.staff_serializer_class
        return self.serializer_class


class IsAdmin(permissions.BasePermission):
    """Admins hold the permission to operate the loop (the Ops group, or superusers): the ops pages and this API."""

    message = "Only admins may do this."

    def has_permission(self, request, view):
        user = request.user
        return bool(user and user.is_authenticated and user.has_perm("training_jobs.operate_loop"))


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into text."""

    default_error_messages = {"invalid": "Not a valid string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)
