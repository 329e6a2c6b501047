from django.db import migrations, models
from django.db.models import Exists, OuterRef


def mark_tenants_with_documents(apps: object, schema_editor: object) -> None:
    tenant, document = apps.get_model("pipeline", "Tenant"), apps.get_model("pipeline", "Document")  # type: ignore[attr-defined]
    tenant.objects.update(has_documents=Exists(document.objects.filter(tenant=OuterRef("pk"))))


class Migration(migrations.Migration):
    dependencies = [("pipeline", "0003_sessionturn_attempt")]

    operations = [
        migrations.AddField(model_name="tenant", name="has_documents", field=models.BooleanField(db_default=False, default=False, editable=False)),
        migrations.RunPython(mark_tenants_with_documents, migrations.RunPython.noop),
    ]
