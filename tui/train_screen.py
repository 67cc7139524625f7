from textual.screen import Screen
from textual.widgets import Footer, Header, Static


class TrainScreen(Screen):
    BINDINGS = []

    def compose(self):
        yield Header()
        yield Static("train")
        yield Footer()
