from textual.screen import Screen
from textual.widgets import Footer, Header, Static


class PipelineScreen(Screen):
    BINDINGS = []

    def compose(self):
        yield Header()
        yield Static("pipeline")
        yield Footer()
