"""The report layer: turns the files a finished (or partly finished) temperature study
leaves behind into its analysis report: tables of results per question and temperature,
plots, the chosen configuration of each question with its diff against Q1, rendered as
Markdown and self-contained HTML. It reads study files only and never imports torch."""
