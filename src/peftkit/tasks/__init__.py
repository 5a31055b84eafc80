"""Task types as records: types.py holds the list (classification, causal-lm, chat, seq2seq) and
the functions generic code asks; config.py the recipe's task section, readable without torch;
one file per type beside them. This file imports nothing, so reading a recipe stays cheap."""
