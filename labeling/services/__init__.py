"""Writes to the labeling domain, by concern. Each service is keyword-only and runs in one transaction.

State changes are guarded by row locks (`select_for_update`) or conditional UPDATEs, never by a check that can
race: two labelers, two browser tabs or a retried request can call any of these at the same time.

- conversations: conversation trees, edits (revisions and branches), moderation, the training-snapshot lock;
- queue: creating tasks, leasing the next one, drafts and lease extension;
- submissions: submitting any task kind (assignment_submit), skipping, reporting, editing a ranking;
- imports: uploaded files and the import job;
- upkeep: VACUUM and ANALYZE of the queue's tables.

Everything is re-exported here, so `from labeling import services; services.task_create(...)` keeps working.
"""

from labeling.limits import CONTENT_SKIP_REASON, IMPORT_ERRORS_KEPT, MAX_MESSAGE_CHARS, SubmissionRefused
from labeling.selectors import display_order
from labeling.services.conversations import (
    api_token_revoke,
    api_token_rotate,
    conversation_create,
    conversation_moderate,
    depends_on,
    labeler_profile_update,
    lock_for_training_snapshot,
    mark_used_in_training,
    message_create,
    message_edit,
    release_used_in_training,
)
from labeling.services.imports import (
    import_job_alive,
    import_job_create,
    import_job_record,
    import_job_run,
    import_jobs_reap,
)
from labeling.services.queue import (
    assignment_save_draft,
    leases_expire,
    prompt_task_for_labeler,
    prompt_tasks_replenish,
    ranking_overlap,
    task_create,
    task_lease_next,
    task_lease_next_id,
)
from labeling.services.submissions import (
    RankingInput,
    SubmitResult,
    assignment_model_draft_record,
    assignment_report,
    assignment_skip,
    assignment_submit,
    draft_edit_ratio,
    prompt_submit,
    ranking_edit,
    ranking_entries_scored,
    ranking_submit,
    reply_submit,
    review_submit,
    validate_ranking,
)
from labeling.services.upkeep import QUEUE_TABLES, queue_tables_vacuum
from labeling.validators import unstorable_text, validate_text

__all__ = [
    "api_token_revoke",
    "api_token_rotate",
    "CONTENT_SKIP_REASON",
    "IMPORT_ERRORS_KEPT",
    "MAX_MESSAGE_CHARS",
    "QUEUE_TABLES",
    "RankingInput",
    "SubmissionRefused",
    "SubmitResult",
    "assignment_model_draft_record",
    "assignment_report",
    "assignment_save_draft",
    "assignment_skip",
    "assignment_submit",
    "conversation_create",
    "conversation_moderate",
    "depends_on",
    "display_order",
    "draft_edit_ratio",
    "import_job_alive",
    "import_job_create",
    "import_job_record",
    "import_job_run",
    "import_jobs_reap",
    "labeler_profile_update",
    "leases_expire",
    "lock_for_training_snapshot",
    "mark_used_in_training",
    "message_create",
    "message_edit",
    "prompt_submit",
    "prompt_task_for_labeler",
    "prompt_tasks_replenish",
    "queue_tables_vacuum",
    "ranking_entries_scored",
    "release_used_in_training",
    "ranking_edit",
    "ranking_overlap",
    "ranking_submit",
    "reply_submit",
    "review_submit",
    "task_create",
    "task_lease_next",
    "task_lease_next_id",
    "unstorable_text",
    "validate_ranking",
    "validate_text",
]
