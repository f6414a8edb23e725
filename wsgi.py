from stageserver import create_app

app = create_app()
