"""PostgreSQL: engine, tables, repositories, the unit of work, migrations and read models."""
