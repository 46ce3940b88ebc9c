"""The words the shared report code writes (html_report's metric and wait texts, the
charts' `Words`), marked for the console's catalogue: they are English message ids there
and translated here. tests/test_console_core checks this list covers them all."""

from __future__ import annotations

from services.projections.console.web import N_

SHARED_WORDS = (
    N_("Specialist access"),
    N_("Share of persons who were given a specialist intervention."),
    N_("Timely start"),
    N_("Share of persons whose first intervention started within 30 days of intake."),
    N_("Guideline adherence"),
    N_("Among persons given an intervention, share given one of top national guideline priority."),
    N_("Family engagement"),
    N_("Among persons with children in the household, share with a family member engaged."),
    N_("Follow-up completion"),
    N_("Among persons with a follow-up, share with a follow-up interview completed."),
    N_("Intake to first personal visit"),
    N_("From the intake to the first personal visit (the Kolada indicator U35537)."),
    N_("Referral to answer"),
    N_("From the first referral to the unit's answer (accepted or declined)."),
    N_("Referral to start"),
    N_("From the first referral to the start of an intervention."),
    N_("End of intervention to follow-up"),
    N_("From the end of the first intervention to a completed follow-up interview."),
    N_("flagged"),
    N_("not flagged"),
    N_("Flag"),
    N_("Estimate"),
    N_("standardised ratio (O/E)"),
    N_("model-based ratio"),
    N_("eligible persons"),
    N_("standardised rate"),
    N_("Control limits"),
    N_("days waited"),
    N_("share still waiting"),
    N_("median"),
    N_("90th percentile"),
    N_("period"),
)
