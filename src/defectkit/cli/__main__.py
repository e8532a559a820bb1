from defectkit.cli import app

app()
