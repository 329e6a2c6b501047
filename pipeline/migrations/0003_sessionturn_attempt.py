from django.db import migrations, models

# Before the constraint: a request that ran twice (possible before attempts were
# fenced) may have stored two pairs of turns. Keep each request's first.
DROP_REPEATED_TURNS = """
DELETE FROM pipeline_sessionturn t
USING pipeline_sessionturn earlier
WHERE t.request_id = earlier.request_id AND t.role = earlier.role AND t.id > earlier.id
"""


class Migration(migrations.Migration):
    dependencies = [("pipeline", "0002_tenant_rate_limits")]

    operations = [
        migrations.AddField(model_name="sessionturn", name="attempt", field=models.PositiveIntegerField(db_default=1, default=1)),
        migrations.RunSQL(DROP_REPEATED_TURNS, reverse_sql=migrations.RunSQL.noop),
        migrations.AddConstraint(
            model_name="sessionturn",
            constraint=models.UniqueConstraint(fields=("request_id", "role"), name="turn_once_per_request"),
        ),
    ]
