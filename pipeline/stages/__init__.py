"""The five stages: plain functions over a frozen ``StageContext``. No ORM, no request object."""
