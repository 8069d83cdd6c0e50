"""Blind A/B human evaluation of base vs tuned replies.

1. ``sheet.write_sheet`` (run by the evaluate stage) writes a self-contained offline HTML page
   for raters and, beside it, the key saying which side (A or B) is which system. The page
   opens with real replies of the persona (``sheet.pick_persona_examples``), so a rater who has
   never met the person knows the voice.
2. The rater picks A, B or tie per item, may tick "loops or breaks" under either reply, and
   downloads ``ratings.csv``.
3. ``score.score_ratings`` (``qlora-pipeline human-eval score``) un-blinds the ratings with the
   key: the tuned model's win rate and each system's rate of broken replies, with intervals.

The file formats both sides share are in ``formats``. The sheet and the scorer are separate
modules, so the evaluate stage (which writes the sheet) does not re-run when the scorer changes.
This file holds no code for the same reason: importing a submodule runs it.
"""
