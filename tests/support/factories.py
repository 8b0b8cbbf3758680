"""factory_boy factories for the domain. Personas (alice, bob, charlie, an admin) live in conftest.py."""

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from labeling.models import Conversation, LabelerProfile, Message, Role, Task, TaskKind
from models_service.models import ModelVersion
from training_jobs.models import TrainingRun


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ["username"]
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", "password")

    @factory.post_generation
    def profile(user, create, extracted, **kwargs):
        if create:
            LabelerProfile.objects.get_or_create(user=user, defaults=kwargs or {"languages": ["en"]})
            user.save()


class ConversationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Conversation

    source = Conversation.Source.LABELER
    language = "en"


class MessageFactory(factory.django.DjangoModelFactory):
    """A human-written message; pass parent= to extend a tree."""

    class Meta:
        model = Message

    conversation = factory.LazyAttribute(lambda m: m.parent.conversation if m.parent else ConversationFactory())
    parent = None
    depth = factory.LazyAttribute(lambda m: m.parent.depth + 1 if m.parent else 0)
    role = factory.LazyAttribute(
        lambda m: Role.USER if m.parent is None or m.parent.role != Role.USER else Role.ASSISTANT
    )
    text = factory.Sequence(lambda n: f"message text {n}")
    origin = Message.Origin.HUMAN
    author = factory.SubFactory(UserFactory)


class ModelVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelVersion

    name = factory.Sequence(lambda n: f"policy-v{n}")
    kind = ModelVersion.Kind.POLICY
    stage = "base"
    status = ModelVersion.Status.READY
    artifact_path = factory.LazyAttribute(lambda m: f"models/{m.name}")


class TaskFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Task

    kind = TaskKind.WRITE_PROMPT


class TrainingRunFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TrainingRun

    kind = "sft"
    status = TrainingRun.Status.QUEUED
    created_at = factory.LazyFunction(timezone.now)
