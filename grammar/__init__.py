"""The recipe grammar (``recipe.lark``), shipped as package data of ``recipec.grammar``."""
