"""The bottom layer: where files live, facts about this CPU, text formatting. Imports nothing above."""
