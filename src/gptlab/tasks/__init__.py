"""The task modules, by the name a checkpoint records (`GPTTask.task_name`)."""

from gptlab.tasks.agent import AgentTask
from gptlab.tasks.classification import ClassificationTask
from gptlab.tasks.language_modeling import LanguageModelingTask
from gptlab.tasks.reward import RewardTask
from gptlab.tasks.seq2seq import Seq2SeqTask
from gptlab.tasks.summarization import SummarizationTask

TASKS = {task.task_name: task for task in
         (LanguageModelingTask, ClassificationTask, Seq2SeqTask, SummarizationTask, AgentTask,
          RewardTask)}
